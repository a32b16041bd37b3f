"""The kohya file's metadata, for SDXL, SD 1.5, SD 2.1 (v) and SD 2 base, read the way AUTOMATIC1111 / Forge and
kohya's sd-scripts read it (re-implemented here from their code: A1111 ``sd_models.read_metadata_from_safetensors``,
``network.NetworkOnDisk``, ``ui_edit_user_metadata``; Forge ``detect_version``; sd-scripts ``train_network.py``,
``train_util.precalculate_safetensors_hashes``, ``resize_lora.py``), and the model card's promises."""
from __future__ import annotations

import datetime
import hashlib
import json
import re

import pytest
import torch

SD2_BASE = dict(cross_attention_dim=1024, use_linear_projection=True)


def read_metadata_like_a1111(path: str) -> dict:
    """``read_metadata_from_safetensors``: the header's ``__metadata__``, values that start with ``{`` JSON-decoded."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        head = f.read(n)
    assert n > 2 and head[:2] in (b'{"', b"{'")
    out = {}
    for k, v in json.loads(head).get("__metadata__", {}).items():
        out[k] = v
        if isinstance(v, str) and v[:1] == "{":
            out[k] = json.loads(v)
    return out


def a1111_version(meta: dict) -> str:
    if str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(meta.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if meta else "Unknown"


def forge_version(meta: dict) -> str:
    arch = meta.get("modelspec.architecture")
    if arch == "stable-diffusion-xl-v1-base/lora" or str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(meta.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if arch == "stable-diffusion-v1/lora" else "Unknown"


def a1111_metadata_table(meta: dict) -> dict:
    """What ``LoraUserMetadataEditor.get_metadata_table`` and ``build_tags`` compute (they raise on a bad type)."""
    table = {k: meta[k] for k in ("ss_output_name", "ss_sd_model_name", "ss_clip_skip", "ss_network_module")
             if meta.get(k) is not None and str(meta[k]) != "None"}
    table["date"] = datetime.datetime.fromtimestamp(float(meta["ss_training_started_at"]), datetime.timezone.utc)
    table["resolutions"] = {f"{b['resolution'][1]}x{b['resolution'][0]}": int(b["count"])
                            for b in meta["ss_bucket_info"]["buckets"].values()}
    table["dataset_size"] = sum(int(p.get("img_count", 0)) for p in meta["ss_dataset_dirs"].values())
    table["tags"] = {tag.strip(): int(n) for d in meta["ss_tag_frequency"].values() for tag, n in d.items()}
    return table


def _facts(version, items, buckets):
    from trainer.export import RunFacts

    return RunFacts(model_id="stabilityai/some-model", version=version, resolution=512, steps=20, epochs=5,
                    batches_per_epoch=4, mixed_precision="bf16", started_at=1_700_000_000.25, items=items,
                    item_buckets=buckets)


FAMILIES = {  # name: (family, U-Net config, prediction type, A1111 tab, ss_base_model_version, architecture)
    "sdxl": ("sdxl", "sdxl_unet", "epsilon", "SDXL", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
    "sd15": ("sd", "sd15_unet", "epsilon", "SD1", "sd_v1", "stable-diffusion-v1/lora"),
    "sd21": ("sd", "sd21_unet", "v_prediction", "SD2", "sd_v2_v", "stable-diffusion-v2-768-v/lora"),
    "sd2-base": ("sd", "sd21_unet", "epsilon", "SD2", "sd_v2", "stable-diffusion-v2-512/lora"),
}


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_metadata_reads_as_a1111_forge_and_kohya_read_it(tmp_path, name, dora):
    from bench.realarch import meta_model
    from trainer.config import TrainConfig
    from trainer.data.sources import TrainItem
    from trainer.export import base_version, kohya_metadata, save_kohya_lora
    from trainer.families import get_family

    fam, unet_kind, pred, tab, kohya_version, arch = FAMILIES[name]
    family = get_family(fam)
    config = meta_model(unet_kind).config
    version = base_version(fam, config, pred)
    cfg = TrainConfig(output_dir=str(tmp_path / "my-run"), instance_data_dir=str(tmp_path / "photos"), rank=4,
                      lora_alpha=8, use_dora=dora, train_text_encoder_ti=True, repeats=2,
                      lora_target_modules="to_k,conv1")
    items = [TrainItem(index=i, name=f"{i}.png", caption=c, size=s) for i, (c, s) in
             enumerate([("a photo of TOK, Smiling", (512, 768)), ("a photo of TOK", (512, 512)),
                        ("a photo of TOK, beach", (768, 512))])]
    buckets = [(448, 576), (512, 512), (576, 448)]
    path = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
    gen = torch.Generator().manual_seed(0)
    unet_sd = {f"{path}.lora_A.weight": torch.randn(4, 640, generator=gen),
               f"{path}.lora_B.weight": torch.randn(640, 4, generator=gen),
               "down_blocks.0.resnets.0.conv1.lora_A.weight": torch.randn(4, 320, 3, 3, generator=gen),
               "down_blocks.0.resnets.0.conv1.lora_B.weight": torch.randn(320, 4, 1, 1, generator=gen),
               # a wide one, so the file passes the 1.1 MiB the legacy hash reads (fp16)
               "mid_block.attentions.0.proj_out.lora_A.weight": torch.randn(4, 163840, generator=gen)}
    if dora:
        unet_sd[f"{path}.lora_magnitude_vector"] = torch.rand(640, generator=gen)
    meta_in = kohya_metadata(cfg, _facts(version, items, buckets), unet_sd)
    assert all(isinstance(v, str) for v in meta_in.values())  # sd-scripts: {k: str(v)}
    file = save_kohya_lora(str(tmp_path), family, cfg, unet_sd, [], meta_in, config)
    meta = read_metadata_like_a1111(file)

    # A1111 / Forge: the tab, the alias, the hash, the "user metadata" table
    assert a1111_version(meta) == tab and forge_version(meta) == tab
    assert meta["ss_output_name"] == "my-run" and file.endswith("my-run.safetensors")
    raw = open(file, "rb").read()
    header = int.from_bytes(raw[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + header:]).hexdigest()  # addnet_hash_safetensors
    table = a1111_metadata_table(meta)
    assert table["date"].year == 2023 and table["dataset_size"] == 3
    assert table["resolutions"] == {"576x448": 2, "512x512": 2, "448x576": 2}  # counts include the repeats
    assert table["tags"] == {"a photo of tok": 3, "smiling": 1, "beach": 1}  # lower-cased, as sd-scripts counts

    # sd-scripts: the same legacy hash from a serialisation with only the ss_ keys; its string formats
    from safetensors.torch import load_file, save

    ss_only = {k: v for k, v in meta_in.items() if k.startswith("ss_")}
    assert meta["sshs_legacy_hash"] == hashlib.sha256(save(load_file(file), ss_only)[0x100000:0x110000]).hexdigest()[:8]
    assert len(raw) > 0x110000
    assert meta["ss_base_model_version"] == kohya_version
    assert meta["ss_v2"] == str(tab == "SD2") and meta["ss_v_parameterization"] == str(pred == "v_prediction")
    assert int(meta["ss_network_dim"]) == 4 and float(meta["ss_network_alpha"]) == 8.0
    assert float(meta["ss_training_started_at"]) == 1_700_000_000.25 and float(meta["ss_training_finished_at"])
    assert meta["ss_mixed_precision"] == "bf16" and meta["ss_clip_skip"] == "None"
    args = json.loads(meta_in["ss_network_args"])
    assert all(isinstance(v, str) for v in args.values()) and args["conv_dim"] == "4" and args["conv_alpha"] == "8.0"
    assert (meta["ss_network_module"], args.get("dora_wd")) == (("lycoris.kohya", "True") if dora
                                                                else ("networks.lora", None))
    datasets = json.loads(meta_in["ss_datasets"])
    assert isinstance(datasets, list) and datasets[0]["is_dreambooth"] is True
    assert datasets[0]["num_train_images"] == 6 and datasets[0]["resolution"] == [512, 512]
    subset = datasets[0]["subsets"][0]
    assert (subset["img_count"], subset["num_repeats"], subset["image_dir"]) == (3, 2, "photos")
    assert subset["is_reg"] is False
    assert meta["ss_dataset_dirs"] == {"photos": {"n_repeats": 2, "img_count": 3}}
    comment = meta["ss_training_comment"]
    assert "<s0><s1>" in comment and "my-run_emb" in comment and "embedding:my-run_emb" in comment

    # ModelSpec as sd-scripts writes it
    assert meta["modelspec.sai_model_spec"] == "1.0.1" and meta["modelspec.architecture"] == arch
    assert meta["modelspec.implementation"] == (
        "https://github.com/Stability-AI/generative-models" if fam == "sdxl" else "diffusers")
    assert meta["modelspec.title"] == "my-run" and re.fullmatch(r"\d+x\d+", meta["modelspec.resolution"])
    assert datetime.datetime.fromisoformat(meta["modelspec.date"]).tzinfo is None
    assert meta["modelspec.trigger_phrase"] == "<s0><s1>" and "my-run_emb" in meta["modelspec.description"]
    assert meta["modelspec.prediction_type"] == ("v" if pred == "v_prediction" else "epsilon")


def test_sd2_is_told_apart_from_sd1_by_the_model_not_its_name(tiny_sd):
    from diffusers import UNet2DConditionModel

    from bench.realarch import meta_model
    from trainer.export import base_version
    from trainer.tiny import tiny_model_path

    assert not base_version("sd", meta_model("sd15_unet").config, "epsilon").v2
    assert base_version("sd", meta_model("sd21_unet").config, "v_prediction").kohya == "sd_v2_v"
    tiny2 = UNet2DConditionModel.load_config(tiny_model_path("tiny-sd2-v"), subfolder="unet")
    tiny1 = UNet2DConditionModel.load_config(tiny_sd, subfolder="unet")
    assert base_version("sd", UNet2DConditionModel.from_config(tiny2).config, "v_prediction").v2
    assert not base_version("sd", UNet2DConditionModel.from_config(tiny1).config, "epsilon").v2


@pytest.mark.parametrize("dora,family_name", [(False, "sdxl"), (True, "sdxl"), (True, "sd")])
def test_model_card_says_which_file_each_tool_takes_and_what_dora_does(tmp_path, dora, family_name):
    from trainer.config import TrainConfig
    from trainer.export import write_model_card
    from trainer.families import get_family

    cfg = TrainConfig(output_dir=str(tmp_path / "me"), use_dora=dora, train_text_encoder_ti=True)
    card = open(write_model_card(str(tmp_path), cfg, get_family(family_name), model_id="base/model", steps=10,
                                 samples=[], has_embeddings=True)).read()
    assert ("`pytorch_lora_weights.safetensors` loads only in diffusers; ComfyUI, AUTOMATIC1111 / Forge and "
            "kohya's sd-scripts load `me.safetensors`") in card
    assert "saved in fp16" in card and "embedding:me_emb" in card
    sdxl = family_name == "sdxl"
    assert ("pipe.text_encoder_2.text_model.eos_token_id = pipe.tokenizer_2.eos_token_id" in card) == sdxl
    assert ("sdxl_train_network.py" in card) == sdxl
    if dora:
        assert "## DoRA in each tool" in card and "cannot reproduce this DoRA" in card
        assert "diffusers drops the DoRA magnitudes" in card and "exactly as trained" in card
    else:
        assert "DoRA" not in card and 'weight_name="me.safetensors")` gives the same image' in card
