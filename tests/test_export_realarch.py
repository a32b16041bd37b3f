"""The kohya file of the real SDXL, SD 1.5 and SD 2.1 architectures (configs in bench/realarch.py, meta device;
only the LoRA tensors, and the base weights of a few layers, are materialised) loads in kohya's sd-scripts,
ComfyUI and AUTOMATIC1111 by their own naming rules (tests/lora_tools.py), key for key, with the right shapes,
and each tool's rebuilt weight equals peft's merged weight: for LoRA on every U-Net module kind plus
text-encoder LoRA, and for DoRA where the tool can represent it (LyCORIS' output-axis DoRA, as sd-scripts'
``lycoris.kohya`` reads it).

Every key's tensors are checked against the peft layer the tool resolves it to (so a key under another
module's name fails); the full weight reconstruction (each tool's formula, conv kernels included) runs on the
smallest layer of each kind, because rebuilding all 2.5e9 weights of the SDXL U-Net four times takes minutes.
"""
from __future__ import annotations

import copy
import re
from collections import defaultdict

import pytest
import torch

from tests import lora_tools as T

BROAD = "to_k,to_q,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2,conv_shortcut,time_emb_proj,conv"
ARCHS = {
    # family, U-Net, text encoders (meta_model kind, ComfyUI kind, A1111 table), prediction type
    "sdxl": ("sdxl", "sdxl_unet",
             [("clip_l", "clip_l", ("hf", "0_", 12)), ("clip_bigg", "clip_g", ("openclip", "1_", 32))], "epsilon"),
    "sd15": ("sd", "sd15_unet", [("clip_l", "clip_l", ("hf", "", 12))], "epsilon"),
    "sd21": ("sd", "sd21_unet", [("clip_h", "clip_h", ("openclip", "", 24))], "v_prediction"),
}
_CACHE: dict = {}


def _fill(t: torch.Tensor, gen, scale: float) -> None:
    with torch.no_grad():
        t.copy_(torch.randn(t.shape, generator=gen) * scale)


def _materialise(model, gen, sample: set[str], dora: bool) -> None:
    """Random LoRA tensors on every peft layer; base weights (and a magnitude near their row norms) on ``sample``."""
    from peft.tuners.lora import LoraLayer

    for name, m in model.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        for part in (m.lora_A, m.lora_B, m.lora_magnitude_vector):
            part.to_empty(device="cpu")
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
        _fill(a, gen, a[0].numel() ** -0.5)
        _fill(b, gen, 0.2)
        if name in sample:
            m.base_layer.to_empty(device="cpu")
            _fill(m.base_layer.weight, gen, m.base_layer.weight[0].numel() ** -0.5)
            if m.base_layer.bias is not None:
                torch.nn.init.zeros_(m.base_layer.bias)
        if dora:
            mag = m.lora_magnitude_vector["default"].weight
            with torch.no_grad():
                rows = (m.base_layer.weight.reshape(mag.numel(), -1).norm(dim=1) if name in sample
                        else torch.ones(mag.numel()))
                mag.copy_((rows * (1 + 0.3 * torch.rand(mag.numel(), generator=gen))).reshape(mag.shape))


def _smallest_per_kind(model, names: list[str]) -> set[str]:
    """The smallest LoRA layer of each kind (what it is inside its block: ``attn2.to_k``, a resnet's ``conv1``, a
    downsampler's ``conv``...), by weight size. Where the block sits is checked for every key by its tensors."""
    best: dict[str, tuple[int, str]] = {}
    mods = dict(model.named_modules())
    for name in names:
        kind = re.sub(r"\.\d+(?=\.|$)", ".N", name)
        kind = re.sub(r"^.*?(attentions|resnets|downsamplers|upsamplers)\.N\.", r"\1.", kind)
        size = mods[name].base_layer.weight.numel()
        if kind not in best or size < best[kind][0]:
            best[kind] = (size, name)
    return {n for _, n in best.values()}


def _adapted(arch: str):
    """The meta-device model of ``arch`` with DoRA adapters (U-Net: BROAD targets; text encoders: q, k, v, out),
    LoRA tensors materialised. A DoRA layer's LoRA part (A, B, alpha, peft's delta weight) is exactly a LoRA
    layer, so the LoRA file is written from the same layers without their magnitudes: one build per arch."""
    if ("model", arch) in _CACHE:
        return _CACHE[("model", arch)]
    from peft.tuners.lora import LoraLayer

    from bench.realarch import meta_model
    from trainer.config import TrainConfig
    from trainer.training.lora import add_text_encoder_lora, add_unet_lora

    _fam, unet_kind, tes, _pred = ARCHS[arch]
    cfg = TrainConfig(rank=4, lora_alpha=8, use_dora=True, lora_target_modules=BROAD, train_text_encoder=True)
    unet = meta_model(unet_kind)
    add_unet_lora(unet, cfg)
    encoders = [meta_model(kind) for kind, _, _ in tes]
    for te in encoders:
        add_text_encoder_lora(te, cfg)
    gen = torch.Generator().manual_seed(0)
    samples = []
    for model in [unet] + encoders:
        sample = _smallest_per_kind(model, [n for n, m in model.named_modules() if isinstance(m, LoraLayer)])
        _materialise(model, gen, sample, dora=True)
        samples.append(sample)
    _CACHE[("model", arch)] = out = (unet, encoders, samples, T.ldm_pairs(unet))
    return out


def exported(arch: str, dora: bool):
    """(family, cfg, unet, text encoders, kohya tensors grouped by module, base-weight sample, LDM pairs)."""
    key = (arch, dora)
    if key in _CACHE:
        return _CACHE[key]
    from trainer.config import TrainConfig
    from trainer.export import to_kohya
    from trainer.families import get_family
    from trainer.training.lora import peft_state_dict

    family = get_family(ARCHS[arch][0])
    unet, encoders, samples, pairs = _adapted(arch)
    cfg = TrainConfig(rank=4, lora_alpha=8, use_dora=dora, lora_target_modules=BROAD, train_text_encoder=True)

    def state(model):
        return {k: v for k, v in peft_state_dict(model).items() if dora or "lora_magnitude_vector" not in k}

    tensors = to_kohya(family, cfg, state(unet), [state(te) for te in encoders], unet.config, torch.float32)
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for k, v in tensors.items():
        name, part = k.split(".", 1)
        modules[name][part] = v
    _CACHE[key] = out = (family, cfg, unet, encoders, dict(modules), samples, pairs)
    return out


_MODULES: dict[int, dict] = {}


def _layer(model, path: str):
    mods = _MODULES.get(id(model))
    if mods is None:
        mods = _MODULES[id(model)] = dict(model.named_modules())
    return mods.get(path) or mods.get(path[len("text_model."):] if path.startswith("text_model.") else path)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


def check_against_peft(arch, dora, targets: dict[str, tuple[int, str]], delta_fn, dora_check=None) -> int:
    """Every file module resolved by a tool (``targets``: kohya module -> (component, path); component 0 is the
    U-Net, 1.. the text encoders) carries that peft layer's tensors in kohya's layout; on the sampled layers the
    tool's rebuilt LoRA weight equals peft's merged weight (1e-5 relative), and for DoRA ``dora_check(W, dW,
    dora_scale, peft's merged W)`` judges the tool's DoRA. Returns how many full rebuilds ran."""
    family, cfg, unet, encoders, modules, samples, _ = exported(arch, dora)
    components = [unet] + encoders
    sampled = {id(_layer(c, p)) for c, sample in zip(components, samples) for p in sample}
    missing = sorted(set(modules) - set(targets))
    assert not missing, f"{len(missing)} of {len(modules)} modules do not map: {missing[:5]}"
    rebuilt = 0
    for name, parts in modules.items():
        comp, path = targets[name]
        layer = _layer(components[comp], path)
        assert layer is not None, (name, path)
        w_shape = tuple(layer.base_layer.weight.shape)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        # kohya's LoRAModule layout: Linear [r, in] / [out, r]; Conv2d [r, in, kh, kw] / [out, r, 1, 1]
        assert down.shape == (cfg.rank, *w_shape[1:])
        assert up.shape == (w_shape[0], cfg.rank, *([1] * (len(w_shape) - 2)))
        assert torch.equal(down, a) and torch.equal(up, b), f"{name} holds another layer's tensors"
        assert parts["alpha"].dim() == 0 and parts["alpha"].item() == cfg.effective_alpha
        if dora:
            assert parts["dora_scale"].shape == (w_shape[0],) + (1,) * (len(w_shape) - 1)
            assert torch.equal(parts["dora_scale"].flatten(), layer.lora_magnitude_vector["default"].weight.flatten())
        else:
            assert "dora_scale" not in parts
        if id(layer) not in sampled:
            continue
        delta = delta_fn(down, up, parts["alpha"], w_shape)
        assert _rel(delta, layer.get_delta_weight("default")) < 1e-5, name
        if dora and dora_check is not None:
            merged = copy.deepcopy(layer)
            merged.merge(safe_merge=True)
            dora_check(layer.base_layer.weight, delta, parts["dora_scale"], merged.get_base_layer().weight)
        rebuilt += 1
    return rebuilt


def exact_dora(tool_dora):
    def check(w, delta, scale, peft_merged):
        assert _rel(tool_dora(w, delta, scale), peft_merged) < 1e-5
    return check


def runs_dora(tool_dora):
    """The tool applies this ``dora_scale`` without an error (no [out, out] broadcast), to a finite weight."""
    def check(w, delta, scale, peft_merged):
        got = tool_dora(w, delta, scale)
        assert got.shape == w.shape and bool(torch.isfinite(got).all())
    return check


def _te_targets(arch, dora, table) -> dict[str, tuple[int, str]]:
    _, _, _, encoders, _, _, _ = exported(arch, dora)
    prefixes = get_prefixes(arch)
    out = {}
    for i, (te, prefix) in enumerate(zip(encoders, prefixes)):
        out.update({k: (i + 1, p) for k, p in table(te, prefix).items()})
    return out


def get_prefixes(arch):
    from trainer.families import get_family

    return get_family(ARCHS[arch][0]).kohya_te_prefixes


# ----- the mapping itself ----------------------------------------------------------------------------------------
def test_ldm_names_are_what_diffusers_single_file_converter_reads_back():
    """Every U-Net tensor of SDXL, SD 1.5, SD 2.1 and the tiny models, renamed to its LDM name, is sent back to its
    own diffusers key by diffusers' single-file converter; the SGM names are those sd-scripts writes."""
    from diffusers import UNet2DConditionModel

    from trainer.export.sgm_names import sgm_module_name
    from trainer.tiny import tiny_model_path

    for arch in ARCHS:
        assert len(_adapted(arch)[3]) > 200  # T.ldm_pairs raised otherwise
    for tiny in ("tiny-sdxl", "tiny-sd", "tiny-sd2-v"):
        cfg = UNet2DConditionModel.load_config(tiny_model_path(tiny), subfolder="unet")
        with torch.device("meta"):
            T.ldm_pairs(UNet2DConditionModel.from_config(cfg))
    sdxl = _adapted("sdxl")[0].config
    for diffusers_name, sgm in [
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k",
         "input_blocks.4.1.transformer_blocks.0.attn1.to_k"),
        ("mid_block.attentions.0.transformer_blocks.3.attn2.to_out.0",
         "middle_block.1.transformer_blocks.3.attn2.to_out.0"),
        ("up_blocks.0.attentions.2.transformer_blocks.0.ff.net.2", "output_blocks.2.1.transformer_blocks.0.ff.net.2"),
        ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
        ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
        ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
        ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
        ("add_embedding.linear_2", "label_emb.0.2"),
    ]:
        assert sgm_module_name(diffusers_name, sdxl) == sgm
    # SD 1.x: up_blocks.0 has no attention, so its upsampler sits at position 1 (A1111's rule)
    assert sgm_module_name("up_blocks.0.upsamplers.0.conv", _adapted("sd15")[0].config) == "output_blocks.2.1.conv"


# ----- per tool ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_sdscripts_loads_every_key(arch, dora):
    family, cfg, unet, encoders, modules, samples, pairs = exported(arch, dora)
    unet_names = T.sdscripts_unet_names(unet, family.kohya_unet_layout == "sgm", pairs)
    # --lora_target_modules BROAD covers every module sd-scripts' LoRA (with conv_dim) trains: same set, same names
    assert {m for m in modules if m.startswith("lora_unet_")} == set(unet_names)
    if arch == "sdxl":
        assert len(unet_names) == 788
        attn = [m for m in unet_names if re.search(r"attn[12]_(to_q|to_k|to_v|to_out_0)$", m)]
        assert len(attn) == 560 and all(m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                                      "lora_unet_output_blocks_")) for m in attn)
    targets = {k: (0, d) for k, d in unet_names.items()}
    targets.update(_te_targets(arch, dora, T.sdscripts_te_names))
    # DoRA: sd-scripts' networks.lora has none; LyCORIS (lycoris.kohya) reads dora_scale and equals peft
    rebuilt = check_against_peft(arch, dora, targets, T.kohya_merge_delta, exact_dora(T.lycoris_dora))
    assert rebuilt >= 10


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_comfyui_loads_every_key(arch, dora):
    family, cfg, unet, encoders, modules, samples, pairs = exported(arch, dora)
    targets = {k: (0, pairs[ldm]) for k, ldm in T.comfy_unet_key_map(pairs).items()}
    kinds = [kind for _, kind, _ in ARCHS[arch][2]]
    clip = T.comfy_clip_key_map(kinds, [te.config.num_hidden_layers for te in encoders])
    targets.update({k: (i + 1, p) for k, (i, p) in clip.items()})
    # DoRA: ComfyUI (and Forge) take the output axis, the one peft decomposes, on every layer without an error;
    # it divides by ||W|| instead of ||W + dW||, so the model card calls it close to the trained weights, not equal
    assert check_against_peft(arch, dora, targets, T.comfy_delta, runs_dora(T.comfy_dora)) >= 10


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_a1111_loads_every_key(arch, dora):
    family, cfg, unet, encoders, modules, samples, pairs = exported(arch, dora)
    layer_names = {"diffusion_model_" + ldm.replace(".", "_"): (0, d) for ldm, d in pairs.items()}
    for i, (_, _, (kind, prefix, n)) in enumerate(ARCHS[arch][2]):
        table = T.hf_clip_layer_names(prefix, n) if kind == "hf" else T.openclip_layer_names(prefix, n)
        layer_names.update({k: (i + 1, p) for k, p in table.items()})
    is_sd2 = arch == "sd21"  # A1111: 'model_transformer_resblocks' in the model's layer names
    targets, per_mha = {}, defaultdict(set)
    for name in modules:
        resolved = T.a1111_resolve(name, layer_names, is_sd2)
        assert resolved is not None, f"A1111 drops {name}"
        comp, path = layer_names[resolved]
        if "(q|k|v)" in path:  # the MHA: q, k and v of one layer; A1111 patches it only when all four are there
            proj = re.search(r"_([qkv])_proj$", name)[1]
            path = path.replace("(q|k|v)", proj)
            per_mha[resolved].add(proj)
        targets[name] = (comp, path)
    for mha, projs in per_mha.items():
        assert projs == {"q", "k", "v"} and f"{mha}_out_proj" in {T.a1111_resolve(n, layer_names, is_sd2)
                                                                  for n in modules}
    # DoRA: A1111 normalises per input column only; the file applies without an error but cannot be peft's DoRA
    assert check_against_peft(arch, dora, targets, T.a1111_delta, runs_dora(T.a1111_dora)) >= 10
