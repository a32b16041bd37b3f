"""The exported files on the tiny SDXL, SD 1.x and SD 2.x-v models: the kohya file and the diffusers file, each
loaded by diffusers, give the image of the adapted model they were written from (LoRA, LoRA + text-encoder LoRA,
DoRA through the diffusers file; the kohya DoRA file is refused by the Generate engine, as the card says);
``--save_precision``; the text-encoder DoRA magnitudes survive diffusers' loader.

The adapters are attached and filled at random directly (no training steps): what is tested is the export.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import render

BROAD = "to_k,to_q,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2,conv_shortcut,time_emb_proj,conv"
VARIANTS = {  # name: (target modules, text-encoder LoRA, DoRA)
    "lora": ("to_k,to_q,to_v,to_out.0", False, False),
    "lora_te": (BROAD, True, False),
    "dora_te": (BROAD, True, True),
}
PROMPT = "a photo of a dog"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 64 px tiny models run faster on one thread of a busy 2-CPU box
    yield
    torch.set_num_threads(n)


def _randomise(model, gen) -> None:
    """Non-zero LoRA B (peft starts it at 0) and magnitudes away from the initial norms."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=gen))


def export_run(tiny: str, variant: str, run_dir: str, precision: str = "fp32"):
    """(family, components with the adapters, cfg, {'diffusers': path, 'kohya': path})."""
    from trainer.config import TrainConfig
    from trainer.export import save_diffusers_lora, save_kohya_lora
    from trainer.families import detect_family, resolve
    from trainer.families.loading import load_parts
    from trainer.training.lora import add_text_encoder_lora, add_unet_lora, peft_state_dict

    targets, te_lora, dora = VARIANTS[variant]
    path = resolve(tiny)
    family = detect_family(path)
    comps = load_parts(family, path)
    cfg = TrainConfig(pretrained_model_name_or_path=tiny, output_dir=run_dir, rank=4, lora_alpha=8,
                      lora_target_modules=targets, train_text_encoder=te_lora, use_dora=dora,
                      save_precision=precision)
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    add_unet_lora(comps.unet, cfg)
    _randomise(comps.unet, gen)
    if te_lora:
        for te in comps.text_encoders:
            add_text_encoder_lora(te, cfg)
            _randomise(te, gen)
    os.makedirs(run_dir, exist_ok=True)
    unet_sd = peft_state_dict(comps.unet)
    te_sds = [peft_state_dict(te) for te in comps.text_encoders] if te_lora else []
    files = {"diffusers": save_diffusers_lora(run_dir, family, cfg, unet_sd, te_sds),
             "kohya": save_kohya_lora(run_dir, family, cfg, unet_sd, te_sds, {"ss_output_name": cfg.run_name},
                                      comps.unet.config)}
    return family, comps, cfg, files


def fresh_pipeline(family, tiny: str):
    from trainer.families import resolve
    from trainer.families.pooling import pool_at_end_of_text

    kwargs = {"safety_checker": None, "requires_safety_checker": False} if family.name == "sd" else {}
    pipe = family.pipeline_class().from_pretrained(resolve(tiny), **kwargs)
    pool_at_end_of_text([getattr(pipe, a) for a in family.text_encoder_attrs],
                        [getattr(pipe, a) for a in family.tokenizer_attrs])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_image(family, comps, pipe) -> np.ndarray:
    """The adapted in-memory model's image (the truth the files must reproduce), with ``pipe``'s scheduler."""
    ref = family.build_pipeline(comps, scheduler=copy.deepcopy(pipe.scheduler))
    ref.set_progress_bar_config(disable=True)
    return render(ref, PROMPT)


@pytest.mark.parametrize("tiny", ["tiny-sdxl", "tiny-sd", "tiny-sd2-v"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kohya_and_diffusers_files_give_the_trained_image_in_diffusers(tmp_path, tiny, variant):
    family, comps, cfg, files = export_run(tiny, variant, str(tmp_path / "run"))
    pipe = fresh_pipeline(family, tiny)
    base = render(pipe, PROMPT)
    want = reference_image(family, comps, pipe)
    assert np.abs(want - base).max() > 1e-2  # the adapters change the image
    pipe.load_lora_weights(os.path.dirname(files["diffusers"]), weight_name=os.path.basename(files["diffusers"]))
    assert np.abs(render(pipe, PROMPT) - want).max() < 1e-5
    if cfg.train_text_encoder:  # every text-encoder layer (DoRA magnitudes included) carries the trained values
        for trained, loaded in zip(comps.text_encoders, [getattr(pipe, a) for a in family.text_encoder_attrs]):
            want_p = {n.replace(".default.", "."): p for n, p in trained.named_parameters() if "lora_" in n}
            got_p = {n.replace(".default_0.", "."): p for n, p in loaded.named_parameters() if "lora_" in n}
            assert set(want_p) == set(got_p) and want_p
            assert all(torch.equal(want_p[n], got_p[n]) for n in want_p), "a text-encoder tensor was lost"
    pipe.unload_lora_weights()
    kohya = load_file(files["kohya"])
    if cfg.use_dora:
        # diffusers drops kohya dora_scale keys (a plain LoRA, not as trained): the engine refuses the file
        from generation import InferenceInputError
        from generation.files import check_lora_against_pipeline

        with pytest.raises(InferenceInputError, match="DoRA.*pytorch_lora_weights.safetensors"):
            check_lora_against_pipeline(pipe, family, kohya, {}, os.path.basename(files["kohya"]))
        assert all(v.shape[1:] in ((1,), (1, 1, 1)) for k, v in kohya.items() if k.endswith(".dora_scale"))
        return
    pipe.load_lora_weights(os.path.dirname(files["kohya"]), weight_name=os.path.basename(files["kohya"]))
    assert np.abs(render(pipe, PROMPT) - want).max() < 1e-5
    if family.name == "sdxl":
        assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                                 "lora_te1_text_model_", "lora_te2_text_model_")) for k in kohya)


def _dtypes(path: str) -> dict[str, torch.dtype]:
    with safe_open(path, "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


@pytest.mark.parametrize("precision,dtype", [("fp16", "F16"), ("bf16", "BF16"), ("fp32", "F32")])
def test_save_precision_applies_to_both_lora_files(tmp_path, precision, dtype):
    family, comps, cfg, files = export_run("tiny-sdxl", "lora_te", str(tmp_path / precision), precision)
    kohya, diff = _dtypes(files["kohya"]), _dtypes(files["diffusers"])
    assert {d for k, d in kohya.items() if not k.endswith(".alpha")} == {dtype}
    assert {d for k, d in kohya.items() if k.endswith(".alpha")} == {"F32"}  # alpha stays exact
    assert set(diff.values()) == {dtype}
    if precision == "fp16":
        # both files hold the same fp16 values: diffusers renders them identically
        pipe = fresh_pipeline(family, "tiny-sdxl")
        pipe.load_lora_weights(str(tmp_path / precision))
        a = render(pipe, PROMPT)
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(tmp_path / precision), weight_name=os.path.basename(files["kohya"]))
        assert np.abs(render(pipe, PROMPT) - a).max() < 1e-6
        fp32 = export_run("tiny-sdxl", "lora_te", str(tmp_path / "fp32"), "fp32")[3]["kohya"]
        assert os.path.getsize(files["kohya"]) < 0.6 * os.path.getsize(fp32)


def test_save_precision_refuses_what_fp16_cannot_hold():
    from trainer.export.files import cast_for_saving

    with pytest.raises(ValueError, match="does not fit float16.*bf16 or fp32"):
        cast_for_saving({"x.lora_up.weight": torch.tensor([1e6])}, torch.float16)
    assert cast_for_saving({"x.alpha": torch.tensor(1e6)}, torch.float16, keep=(".alpha",))["x.alpha"].dtype \
        == torch.float32


def test_save_precision_flag_and_kohya_spelling():
    from trainer.config import ConfigError, TrainConfig

    assert TrainConfig.from_dict({"save_precision": "float"}).save_precision.value == "fp32"
    assert TrainConfig().save_precision.value == "fp16"
    with pytest.raises(ConfigError, match="save_precision.*fp16, bf16, fp32"):
        TrainConfig.from_dict({"save_precision": "fp8"})


def test_the_dora_numbers_of_the_card_are_what_comfyui_and_a1111_compute(tmp_path):
    from peft.tuners.lora import LoraLayer

    from tests import lora_tools as T
    from trainer.export import dora_tool_deviation, write_model_card
    from trainer.export.kohya import kohya_module_name

    family, comps, cfg, files = export_run("tiny-sdxl", "dora_te", str(tmp_path / "run"))
    measured = dora_tool_deviation([comps.unet] + comps.text_encoders)
    kohya = load_file(files["kohya"])
    worst = {"comfyui": 0.0, "a1111": 0.0}
    prefixes = ["lora_unet"] + list(family.kohya_te_prefixes)
    for prefix, model in zip(prefixes, [comps.unet] + comps.text_encoders):
        for path, layer in model.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            name = kohya_module_name(family, prefix, path, comps.unet.config)
            w = layer.get_base_layer().weight.detach()
            scale = kohya[f"{name}.dora_scale"]
            delta = T.comfy_delta(kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"],
                                  kohya[f"{name}.alpha"], w.shape)
            trained = copy.deepcopy(layer)
            trained.merge(safe_merge=True)
            want = trained.get_base_layer().weight.detach()
            for tool, fn in (("comfyui", T.comfy_dora), ("a1111", T.a1111_dora)):
                worst[tool] = max(worst[tool], float((fn(w, delta, scale) - want).norm() / want.norm()))
    assert measured.keys() == worst.keys()
    for tool in worst:
        assert measured[tool] == pytest.approx(worst[tool], rel=1e-3) and measured[tool] > 1e-4
    card = open(write_model_card(str(tmp_path), cfg, family, model_id="tiny-sdxl", steps=1, samples=[],
                                 has_embeddings=False, dora_deviation=measured)).read()
    assert f"each layer within {100 * measured['comfyui']:.2g} %" in card
    assert f"layers off by up to {100 * measured['a1111']:.2g} %" in card


def test_modules_sdscripts_cannot_take_are_named(tiny_sdxl):
    from diffusers import UNet2DConditionModel

    from trainer.config import TrainConfig
    from trainer.export.kohya import outside_sdscripts_blocks
    from trainer.training.lora import add_unet_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    add_unet_lora(unet, TrainConfig(lora_target_modules="to_k,conv1,conv,conv_in,linear_1"))
    assert outside_sdscripts_blocks(unet) == ["conv_in", "time_embedding.linear_1", "add_embedding.linear_1"]
