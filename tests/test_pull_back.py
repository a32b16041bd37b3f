"""--pull_back_token_norm: the new token rows are rescaled toward the vocabulary's std after each step, as
diffusers' advanced script does (``retract_embeddings``); off by default."""
from __future__ import annotations

import torch

from trainer import TrainConfig
from trainer.training.trainer import Trainer

BASE = dict(pretrained_model_name_or_path="tiny-sdxl", max_train_steps=6, rank=4, seed=1, optimizer="adamw",
            learning_rate=1e-4, text_encoder_lr=0.01, train_text_encoder_ti=True, train_text_encoder_ti_frac=1.0,
            max_grad_norm=0.0)


def _ratios(dataset, out, **kw) -> list[float]:
    """The new rows' std over the vocabulary's std, per text encoder, after training."""
    t = Trainer(TrainConfig.from_sources(**{**BASE, "instance_data_dir": dataset, "output_dir": out, **kw})).open()
    t.setup()
    assert all(abs(m.new_rows.std().item() / s - 1) < 0.5 for m, s in zip(t.pivotal.modules, t.pivotal.vocab_std))
    t.train_steps(0, t.total)
    return [m.new_rows.std().item() / s for m, s in zip(t.pivotal.modules, t.pivotal.vocab_std)]


def test_pull_back_keeps_the_new_rows_near_the_vocabulary_std(dataset, tmp_path, tiny_sdxl):
    free = _ratios(dataset, str(tmp_path / "free"))
    pulled = _ratios(dataset, str(tmp_path / "pulled"), pull_back_token_norm=True)
    print("std ratio without / with the pull-back:", free, pulled)
    for f, p in zip(free, pulled):
        assert abs(torch.log(torch.tensor(p))) < abs(torch.log(torch.tensor(f)))  # closer to the vocabulary's
    assert max(abs(f - 1) for f in free) > 0.5  # the rows really drifted without it


def test_pull_back_converges_and_leaves_flat_rows_alone():
    from trainer.training.pivotal import EmbeddingWithNewTokens, PivotalTokens

    tokens = PivotalTokens({"TOK": ["<s0>", "<s1>"]})
    base = torch.nn.Embedding(10, 8)
    torch.nn.init.normal_(base.weight, std=0.02)
    tokens.modules = [EmbeddingWithNewTokens(base, torch.randn(2, 8) * 0.06)]  # 3x the vocabulary's spread
    tokens.vocab_std = [base.weight.std().item()]
    for _ in range(40):
        tokens.pull_back()
    assert abs(tokens.modules[0].new_rows.std().item() / tokens.vocab_std[0] - 1) < 0.05
    tokens.modules[0].new_rows.data.fill_(0.5)  # no spread: nothing to scale, no NaN
    tokens.pull_back()
    assert torch.equal(tokens.modules[0].new_rows, torch.full((2, 8), 0.5))
