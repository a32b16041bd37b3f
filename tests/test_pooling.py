"""SDXL's pooled text vector with learnt tokens: training, the validation pipelines and the Generate engine take it
at the first end-of-text token, where ComfyUI and A1111 take it (re-implemented here), not at ``argmax(ids)``
(= the highest learnt token, transformers' rule for the legacy ``eos_token_id = 2`` of the SDXL configs). Prompts
without learnt tokens pool exactly as before."""
from __future__ import annotations

import pytest
import torch

PROMPTS = ["a photo of <s0><s1> dog", "a photo of a dog"]


def comfy_pooled(encoder, ids: torch.Tensor, eos: int) -> torch.Tensor:
    """ComfyUI ``CLIPTextModel_.forward`` with ``num_tokens``: the final-layer-norm hidden state at the first
    end-of-text token (its attention mask counts up to and including it), through ``text_projection``."""
    hidden = encoder(ids, output_hidden_states=True).last_hidden_state
    first_eos = torch.tensor([row.tolist().index(eos) for row in ids])
    return encoder.text_projection(hidden[torch.arange(ids.shape[0]), first_eos])


def a1111_pool_position(ids: torch.Tensor, base_vocab: int) -> torch.Tensor:
    """A1111 fills embedding positions with token 0, then pools at ``argmax`` (sgm ``FrozenOpenCLIPEmbedder2``)."""
    return torch.where(ids >= base_vocab, torch.zeros_like(ids), ids).argmax(dim=-1)


@pytest.fixture
def sdxl_with_tokens(tiny_sdxl):
    from trainer.families import get_family
    from trainer.families.loading import load_parts
    from trainer.training.pivotal import PivotalTokens
    from trainer.training.placeholders import new_tokens

    family = get_family("sdxl")
    comps = load_parts(family, tiny_sdxl)
    base_vocab = len(comps.tokenizers[1])
    PivotalTokens(new_tokens("TOK", 2)).install(comps.tokenizers, comps.text_encoders,
                                               generator=torch.Generator().manual_seed(0))
    return family, comps, base_vocab


@torch.no_grad()
def test_training_pools_where_comfyui_and_a1111_do(sdxl_with_tokens):
    family, comps, base_vocab = sdxl_with_tokens
    ids = family.tokenize(comps, PROMPTS)
    _embeds, pooled = family.encode(comps, ids)
    tok2, te2 = comps.tokenizers[1], comps.text_encoders[1]
    want = comfy_pooled(te2, ids[1], tok2.eos_token_id)
    torch.testing.assert_close(pooled, want, rtol=0, atol=1e-6)
    first_eos = (ids[1] == tok2.eos_token_id).int().argmax(dim=-1)
    assert torch.equal(a1111_pool_position(ids[1], base_vocab), first_eos)
    # transformers' legacy rule (eos_token_id = 2) pools the learnt-token prompt at <s1>, and the plain one as now
    te2.text_model.eos_token_id = 2
    legacy = te2(ids[1])[0]
    assert tok2.convert_ids_to_tokens(int(ids[1][0].max())) == "<s1>"  # argmax(ids) is a learnt token
    assert (legacy[0] - want[0]).abs().max() > 1e-3
    assert torch.equal(legacy[1], pooled[1])


@torch.no_grad()
def test_validation_pipeline_pools_like_training(sdxl_with_tokens):
    family, comps, _ = sdxl_with_tokens
    _embeds, pooled = family.encode(comps, family.tokenize(comps, PROMPTS))
    pipe = family.build_pipeline(comps)
    got = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[2]
    torch.testing.assert_close(got, pooled, rtol=0, atol=1e-6)


@torch.no_grad()
def test_generate_engine_pools_where_comfyui_does(tmp_path, tiny_sdxl):
    from safetensors.torch import save_file

    from generation import Engine

    emb = tmp_path / "run_emb.safetensors"
    gen = torch.Generator().manual_seed(1)
    save_file({"clip_l": torch.randn(2, 32, generator=gen), "clip_g": torch.randn(2, 48, generator=gen)}, str(emb))
    engine = Engine(device="cpu")
    try:
        engine._ensure_pipeline("tiny-sdxl")
        engine._apply_embeddings(str(emb), ["<s0>", "<s1>"])
        pipe = engine.pipe
        pooled = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=False)[2]
        ids = pipe.tokenizer_2(PROMPTS, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
        assert ids[0].max() >= len(engine._pristine_tokenizers["tokenizer_2"])  # the learnt tokens are in
        torch.testing.assert_close(pooled, comfy_pooled(pipe.text_encoder_2, ids, pipe.tokenizer_2.eos_token_id),
                                   rtol=0, atol=1e-6)
    finally:
        engine.release()
