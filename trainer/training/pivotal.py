"""Pivotal tuning: new tokens ``<s0><s1>...`` replace each placeholder (``TOK``) and are learnt by textual
inversion for the first part of the run, then frozen.

Only the new rows are trainable, as their own small ``nn.Parameter`` of shape [n_new, hidden] per text
encoder: the original embedding matrix is never in the optimizer, carries no optimizer state, and stays
bit-identical (the known failure of training the whole matrix and restoring old rows afterwards is absent by
construction).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class EmbeddingWithNewTokens(nn.Module):
    """Drop-in replacement of a text encoder's token embedding: frozen base rows + trainable new rows."""

    def __init__(self, base: nn.Embedding, new_rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.num_base = base.weight.shape[0]
        self.new_rows = nn.Parameter(new_rows.detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:  # what callers of get_input_embeddings().weight expect
        return torch.cat([self.base.weight, self.new_rows.to(self.base.weight.dtype)], dim=0)

    @property
    def embedding_dim(self) -> int:
        return self.base.weight.shape[1]

    @property
    def num_embeddings(self) -> int:
        return self.num_base + self.new_rows.shape[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # No data-dependent branch (it would force a host-device sync on every prompt encoding).
        is_new = input_ids >= self.num_base
        base = F.embedding(input_ids.clamp(max=self.num_base - 1), self.base.weight)
        new = F.embedding((input_ids - self.num_base).clamp(min=0), self.new_rows.to(base.dtype))
        return torch.where(is_new.unsqueeze(-1), new, base)


class PivotalTokens:
    """Adds the new tokens to every tokenizer / text encoder of a family and owns their trainable rows."""

    def __init__(self, tokens_per_abstraction: dict[str, list[str]]):
        self.mapping = tokens_per_abstraction
        self.tokens = [t for toks in tokens_per_abstraction.values() for t in toks]
        self.modules: list[EmbeddingWithNewTokens] = []
        self.token_ids: list[list[int]] = []
        self.vocab_std: list[float] = []  # std of each encoder's original embedding matrix

    def install(self, tokenizers, text_encoders, generator: Optional[torch.Generator] = None) -> None:
        for tok, te in zip(tokenizers, text_encoders):
            clash = [t for t in self.tokens if t in tok.get_vocab()]
            if clash:
                raise ValueError(f"the tokenizer already has tokens {clash}; choose another --token_abstraction")
            base = te.get_input_embeddings()
            rows_before = base.weight.shape[0]
            added = tok.add_tokens(self.tokens)
            ids = tok.convert_tokens_to_ids(self.tokens)
            if added != len(self.tokens) or ids != list(range(rows_before, rows_before + len(self.tokens))):
                raise ValueError(
                    f"new token ids {ids} do not follow the embedding matrix ({rows_before} rows); the tokenizer "
                    "and text encoder of this model disagree on the vocabulary size")
            w = base.weight.detach().float()
            # Initialise from the statistics of the existing embeddings (as textual inversion / cog-sdxl do).
            std = w.std().item()
            self.vocab_std.append(std)
            init = torch.randn(len(self.tokens), w.shape[1], generator=generator) * std
            module = EmbeddingWithNewTokens(base, init.to(w.device))
            set_token_embedding(te, module)
            self.modules.append(module)
            self.token_ids.append(ids)

    def parameters(self) -> list[nn.Parameter]:
        return [m.new_rows for m in self.modules]

    @torch.no_grad()
    def pull_back(self, power: float = 0.1) -> None:
        """``--pull_back_token_norm``: scales each encoder's new rows by (vocabulary std / rows std) ** power, as
        diffusers' advanced script does after every step (``retract_embeddings``): rows whose spread grows away
        from the vocabulary's are pulled back a little each step, so the text encoder keeps seeing embeddings of
        the magnitude it was trained on."""
        for m, std in zip(self.modules, self.vocab_std):
            rows_std = m.new_rows.std()
            # no host read: rows without spread (or not finite) keep their scale
            ratio = torch.where(rows_std > 0, std / rows_std.clamp_min(1e-12), torch.ones_like(rows_std))
            m.new_rows.mul_(ratio ** power)

    def set_trainable(self, trainable: bool) -> None:
        for p in self.parameters():
            p.requires_grad_(trainable)

    def state_dict(self, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` (fp32, on CPU)."""
        return {k: m.new_rows.detach().float().cpu().contiguous() for k, m in zip(keys, self.modules)}

    def load_state_dict(self, state: dict[str, torch.Tensor], keys: tuple[str, ...]) -> None:
        with torch.no_grad():
            for k, m in zip(keys, self.modules):
                m.new_rows.copy_(state[k].to(m.new_rows.device, m.new_rows.dtype))


def set_token_embedding(text_encoder, module: nn.Module) -> None:
    # transformers 5 flattened CLIPTextModel (no .text_model); older versions nest it.
    getattr(text_encoder, "text_model", text_encoder).embeddings.token_embedding = module

