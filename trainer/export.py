"""Artifacts the ecosystem loads, written into the run folder:

- ``pytorch_lora_weights.safetensors``: diffusers format (``pipe.load_lora_weights(run_dir)``).
- ``<name>.safetensors``: kohya keys (``lora_unet_*``, ``lora_te1_*``/``lora_te2_*`` for SDXL, ``lora_te_*`` for
  SD) with the real ``alpha`` (diffusers' converter writes alpha = rank, wrong whenever lora_alpha != rank) and
  ``ss_*`` metadata, for A1111 / ComfyUI / kohya.
- ``<name>_emb.safetensors``: learnt token rows, ``clip_l`` (and ``clip_g`` for SDXL).
- ``README.md``: a model card with usage in diffusers, A1111 and ComfyUI.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from typing import Optional

import torch
from safetensors.torch import save_file

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def _atomic_save(tensors: dict, path: str, metadata: Optional[dict] = None) -> None:
    tmp = path + ".tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def lora_metadata(cfg, targets: Optional[list[str]] = None) -> dict:
    from peft import LoraConfig

    targets = targets or [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()]
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.effective_alpha, target_modules=targets,
                      use_dora=cfg.use_dora).to_dict()


def save_diffusers_lora(run_dir: str, family, cfg, unet_sd: dict, te_sds: list[dict]) -> str:
    from diffusers.utils import convert_state_dict_to_diffusers

    kwargs = {"unet_lora_layers": convert_state_dict_to_diffusers(unet_sd),
              "unet_lora_adapter_metadata": lora_metadata(cfg)}
    names = ["text_encoder_lora_layers", "text_encoder_2_lora_layers"]
    from .lora import TEXT_ENCODER_TARGETS

    for name, sd in zip(names, te_sds):
        if sd:
            kwargs[name.replace("_layers", "_adapter_metadata")] = lora_metadata(cfg, TEXT_ENCODER_TARGETS)
            # transformers 5 dropped the `text_model.` level of CLIPTextModel; diffusers' loader (and every
            # other tool) still matches text-encoder LoRA keys under it, so write them the classic way.
            sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}
            kwargs[name] = convert_state_dict_to_diffusers(sd)
    family.pipeline_class().save_lora_weights(run_dir, weight_name=LORA_WEIGHTS, safe_serialization=True, **kwargs)
    return os.path.join(run_dir, LORA_WEIGHTS)


def to_kohya(family, cfg, unet_sd: dict, te_sds: list[dict]) -> dict[str, torch.Tensor]:
    """peft-named LoRA tensors -> kohya names with alpha (diffusers module names, as A1111/ComfyUI accept)."""
    out: dict[str, torch.Tensor] = {}
    alpha = torch.tensor(float(cfg.effective_alpha))
    parts = [("lora_unet", unet_sd)] + list(zip(family.kohya_te_prefixes, te_sds))
    for prefix, sd in parts:
        for key, value in (sd or {}).items():
            m = re.match(r"^(.*)\.(lora_A|lora_B|lora_magnitude_vector)(?:\.weight)?$", key)
            if not m:
                continue
            name = m.group(1)
            if prefix != "lora_unet" and not name.startswith("text_model."):
                name = "text_model." + name  # transformers 5 flattened CLIPTextModel; kohya/A1111 keep text_model
            module = prefix + "_" + name.replace(".", "_")
            kind = {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight",
                    "lora_magnitude_vector": "dora_scale"}[m.group(2)]
            out[f"{module}.{kind}"] = value
            if m.group(2) == "lora_A":
                out[f"{module}.alpha"] = alpha.clone()
    return out


def kohya_metadata(cfg, family, num_images: int, steps: int, resolution: int, captions: list[str],
                   model_id: str) -> dict[str, str]:
    tags = Counter(t.strip() for c in captions for t in c.split(",") if t.strip())
    trigger = " ".join(cfg.tokens_per_abstraction.get(a, [a])[0] if cfg.train_text_encoder_ti else a
                       for a in cfg.abstractions)
    return {
        "ss_base_model_version": "sdxl_base_v1-0" if family.name == "sdxl" else "sd_v1",
        "ss_sd_model_name": model_id,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(cfg.effective_alpha),
        "ss_network_dropout": str(cfg.lora_dropout),
        "ss_num_train_images": str(num_images),
        "ss_max_train_steps": str(steps),
        "ss_steps": str(steps),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_text_encoder_lr": str(cfg.effective_text_lr),
        "ss_unet_lr": str(cfg.learning_rate),
        "ss_optimizer": str(cfg.optimizer.value),
        "ss_lr_scheduler": str(cfg.lr_scheduler.value),
        "ss_seed": str(cfg.seed),
        "ss_training_comment": f"trigger: {trigger}; tokens: {json.dumps(cfg.tokens_per_abstraction)}",
        "ss_tag_frequency": json.dumps({"dataset": dict(tags.most_common(200))}),
        "ss_v2": str(family.name == "sd" and "v_prediction" in model_id),
        "modelspec.title": cfg.run_name,
        "modelspec.trigger_phrase": "".join(t for ts in cfg.tokens_per_abstraction.values() for t in ts),
        "ss_training_finished_at": str(int(time.time())),
    }


def save_kohya_lora(run_dir: str, family, cfg, unet_sd, te_sds, metadata: dict) -> str:
    path = os.path.join(run_dir, f"{cfg.run_name}.safetensors")
    _atomic_save(to_kohya(family, cfg, unet_sd, te_sds), path, metadata=metadata)
    return path


def save_embeddings(run_dir: str, cfg, emb: dict[str, torch.Tensor]) -> str:
    path = os.path.join(run_dir, f"{cfg.run_name}_emb.safetensors")
    _atomic_save(emb, path)
    return path


def write_model_card(run_dir: str, cfg, family, *, model_id: str, steps: int, samples: list[str],
                     has_embeddings: bool) -> str:
    tokens = cfg.tokens_per_abstraction
    all_tokens = [t for ts in tokens.values() for t in ts]
    token_str = "".join(all_tokens)
    name = cfg.run_name
    pipe_cls = "StableDiffusionXLPipeline" if family.name == "sdxl" else "StableDiffusionPipeline"
    emb_lines = ""
    if has_embeddings:
        loads = [f'pipe.load_textual_inversion(state_dict["clip_l"], token={all_tokens!r}, '
                 'text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)']
        if family.name == "sdxl":
            loads.append(f'pipe.load_textual_inversion(state_dict["clip_g"], token={all_tokens!r}, '
                         'text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)')
        emb_lines = (f'\nembedding_path = hf_hub_download(repo_id=REPO, filename="{name}_emb.safetensors")\n'
                     "state_dict = load_file(embedding_path)\n" + "\n".join(loads) + "\n")
    prompt = (cfg.validation_prompt or cfg.instance_prompt)
    for abst, toks in tokens.items():
        prompt = prompt.replace(abst, "".join(toks) if has_embeddings else abst)
    gallery = "\n".join(f"![sample](samples/{os.path.basename(s)})" for s in samples[-4:])
    trigger_note = (f"The placeholder `{', '.join(cfg.abstractions)}` was replaced by the learnt tokens "
                    f"`{token_str}`: use `{token_str}` in prompts (diffusers) or the embedding name (A1111/ComfyUI)."
                    if has_embeddings else f"Trigger: `{', '.join(cfg.abstractions)}`.")
    card = f"""---
base_model: {model_id}
tags:
- stable-diffusion{'-xl' if family.name == 'sdxl' else ''}
- lora
- dreambooth
- pivotal-tuning
- diffusers
license: openrail++
instance_prompt: {cfg.instance_prompt}
---

# {name}

A DreamBooth LoRA for `{model_id}` (rank {cfg.rank}, alpha {cfg.effective_alpha:g}, {steps} steps,
{cfg.optimizer.value}{', pivotal tuning' if has_embeddings else ''}).

{trigger_note}

{gallery}

## Files
- `pytorch_lora_weights.safetensors`: diffusers LoRA.
- `{name}.safetensors`: kohya/A1111/ComfyUI LoRA.
{f"- `{name}_emb.safetensors`: the learnt embeddings (`clip_l`{', `clip_g`' if family.name == 'sdxl' else ''})." if has_embeddings else ''}

## diffusers
```python
import torch
from diffusers import {pipe_cls}
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file

REPO = "{cfg.hub_model_id or 'your-name/' + name}"
pipe = {pipe_cls}.from_pretrained("{model_id}", torch_dtype=torch.float16).to("cuda")
pipe.load_lora_weights(REPO, weight_name="pytorch_lora_weights.safetensors")
{emb_lines}
image = pipe("{prompt}", cross_attention_kwargs={{"scale": 0.9}}).images[0]
```

## AUTOMATIC1111 / SD.Next
Put `{name}.safetensors` in `models/Lora`{f' and `{name}_emb.safetensors` in `embeddings`' if has_embeddings else ''}, then prompt
`{'a ' + name + '_emb' if has_embeddings else cfg.instance_prompt} ... <lora:{name}:0.9>`.

## ComfyUI
Load `{name}.safetensors` with a LoraLoader node{f'; put `{name}_emb.safetensors` in `models/embeddings` and write `embedding:{name}_emb` in the prompt' if has_embeddings else ''}.
"""
    path = os.path.join(run_dir, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(card)
    return path


HUB_PATTERNS = ["*.safetensors", "README.md", "samples/*.png", "config.json"]


def push_to_hub(run_dir: str, repo_id: str, token: Optional[str], private: bool = False,
                commit_message: str = "Upload LoRA") -> str:
    """Uploads the artifacts (never checkpoints or logs). The token is passed through, never stored."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=run_dir, repo_id=repo_id, allow_patterns=HUB_PATTERNS,
                          ignore_patterns=["checkpoints/*", "events.jsonl", "logs/*", "dataset/*"],
                          commit_message=commit_message)
    except Exception as exc:
        raise HubError(describe_hub_error(exc, token)) from None
    return str(url)


class HubError(RuntimeError):
    pass


def describe_hub_error(exc: Exception, token: Optional[str]) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if token:
        text = text.replace(token, "***")
    low = text.lower()
    if "401" in low or "unauthorized" in low or "invalid" in low and "token" in low:
        msg = "the Hub rejected the token (401). Create a token with write access at huggingface.co/settings/tokens."
    elif "403" in low or "forbidden" in low:
        msg = "the token may not write to this repo (403): use a write token or a repo under your own name."
    elif any(w in low for w in ("offline", "connect", "resolve", "max retries", "timed out", "network")):
        msg = "the Hub could not be reached (no network). The run folder is complete; push again when online."
    else:
        msg = text[:300]
    return f"Push to the Hub failed: {msg}"
