"""``README.md``: the model card: base model, trigger, which file each tool takes, usage in diffusers, A1111 /
Forge, ComfyUI and kohya's sd-scripts, what each tool reproduces of a DoRA, and the samples."""
from __future__ import annotations

import os
from typing import Optional

from ..training.placeholders import replace_placeholders
from .embeddings import embeddings_file_name
from .files import LORA_WEIGHTS
from .kohya import kohya_file_name
from .triggers import diffusers_trigger, embedding_name


def _files_section(cfg, family, has_embeddings: bool) -> str:
    kohya, emb = kohya_file_name(cfg), embeddings_file_name(cfg)
    keys = "`clip_l`, `clip_g`" if family.name == "sdxl" else "`clip_l`"
    lines = [f"`{LORA_WEIGHTS}` loads only in diffusers; ComfyUI, AUTOMATIC1111 / Forge and kohya's sd-scripts "
             f"load `{kohya}`" + (f", and every tool takes the learnt embeddings from `{emb}`." if has_embeddings
                                  else "."), "",
             f"- `{LORA_WEIGHTS}`: diffusers LoRA (peft keys and adapter config).",
             f"- `{kohya}`: kohya-format LoRA (kohya's key names, alpha, `ss_*` and ModelSpec metadata)."]
    if has_embeddings:
        lines.append(f"- `{emb}`: the learnt embeddings ({keys}).")
    precision = getattr(cfg.save_precision, "value", cfg.save_precision)
    lines += ["", f"The files are saved in {precision}."]
    return "\n".join(lines)


def _diffusers_section(cfg, family, has_embeddings: bool, model_id: str) -> str:
    sdxl = family.name == "sdxl"
    pipe_cls = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    tokens = [t for ts in cfg.tokens_per_abstraction.values() for t in ts]
    emb_lines = ""
    if has_embeddings:
        loads = [f'pipe.load_textual_inversion(state_dict["clip_l"], token={tokens!r}, '
                 'text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)']
        if sdxl:
            loads.append(f'pipe.load_textual_inversion(state_dict["clip_g"], token={tokens!r}, '
                         'text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)')
            # the one rule of trainer/families/pooling.py, in the form a diffusers user can paste
            loads += ["# Pool the text embedding at the end-of-text token, as in training (and in ComfyUI / A1111):",
                      "pipe.text_encoder_2.text_model.eos_token_id = pipe.tokenizer_2.eos_token_id"]
        emb_lines = (f'\nembedding_path = hf_hub_download(repo_id=REPO, filename="{embeddings_file_name(cfg)}")\n'
                     "state_dict = load_file(embedding_path)\n" + "\n".join(loads) + "\n")
    prompt = cfg.validation_prompt or cfg.instance_prompt
    if has_embeddings:
        prompt = replace_placeholders(prompt, cfg.tokens_per_abstraction)
    kohya_note = (f"`pipe.load_lora_weights(REPO, weight_name=\"{kohya_file_name(cfg)}\")` gives the same image"
                  if not cfg.use_dora else
                  f"Use `{LORA_WEIGHTS}` here: diffusers drops the DoRA magnitudes (`dora_scale`) of "
                  f"`{kohya_file_name(cfg)}` and would render it as a plain LoRA")
    pooling = ""
    if sdxl and has_embeddings:
        pooling = ("\n\nSDXL conditions on a pooled text vector. Training took it at the end-of-text token, as "
                   "ComfyUI, A1111 / Forge and sd-scripts do; diffusers' SDXL text encoder config pools at the "
                   f"highest token id, which is a learnt token once `{tokens[-1]}` is loaded. The "
                   "`eos_token_id` line above makes diffusers pool where training did; without it the U-Net gets "
                   "another pooled vector than the one it was trained with.")
    return f"""## diffusers
```python
import torch
from diffusers import {pipe_cls}
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file

REPO = "{cfg.hub_model_id or 'your-name/' + cfg.run_name}"
pipe = {pipe_cls}.from_pretrained("{model_id}", torch_dtype=torch.float16).to("cuda")
pipe.load_lora_weights(REPO, weight_name="{LORA_WEIGHTS}")
{emb_lines}
image = pipe("{prompt}", cross_attention_kwargs={{"scale": 0.9}}).images[0]
```

{kohya_note}.{pooling}"""


def _tools_section(cfg, family, has_embeddings: bool) -> str:
    kohya, name = kohya_file_name(cfg), cfg.run_name
    emb = embedding_name(cfg)
    a1111_prompt = ("a " + emb) if has_embeddings else cfg.instance_prompt
    sdxl = family.name == "sdxl"
    script = "sdxl_train_network.py" if sdxl else "train_network.py"
    merge = "networks/sdxl_merge_lora.py" if sdxl else "networks/merge_lora.py"
    module = ("--network_module lycoris.kohya --network_args algo=lora dora_wd=True" if cfg.use_dora
              else "--network_module networks.lora")
    merge_note = " (it has no DoRA: it merges the LoRA part only)" if cfg.use_dora else ""
    return f"""## AUTOMATIC1111 / Forge
Put `{kohya}` in `models/Lora`{f' and `{emb}.safetensors` in `embeddings`' if has_embeddings else ''}, then prompt
`{a1111_prompt} ... <lora:{name}:0.9>`.

## ComfyUI
Load `{kohya}` with a LoraLoader node{f'; put `{emb}.safetensors` in `models/embeddings` and write `embedding:{emb}` in the prompt' if has_embeddings else ''}.

## kohya's sd-scripts
`{kohya}` is named the way sd-scripts names its own LoRA: continue training with
`{script} {module} --network_dim {cfg.rank} --network_alpha {cfg.effective_alpha:g} --network_weights {kohya}`,
or merge it with `{merge} --models {kohya}`{merge_note}. The file's `ss_network_args` metadata lists any further
`--network_args` it needs (`conv_dim` when convolutions carry LoRA)."""


def _measured(deviation: Optional[dict], tool: str, wording: str) -> str:
    if not deviation or tool not in deviation:
        return ""
    return f" (measured on this file: {wording} {100 * deviation[tool]:.2g} % of the trained weights)"


def _dora_section(cfg, deviation: Optional[dict]) -> str:
    if not cfg.use_dora:
        return ""
    kohya = kohya_file_name(cfg)
    comfy = _measured(deviation, "comfyui", "each layer within")
    a1111 = _measured(deviation, "a1111", "layers off by up to")
    return f"""

## DoRA in each tool
This is a DoRA (weight-decomposed LoRA): every adapted layer is rescaled row by row to a learnt magnitude,
W' = m / ||W + dW|| * (W + dW), per output row, as peft trained it. Not every tool computes that:

| tool | file | result |
|---|---|---|
| diffusers | `{LORA_WEIGHTS}` | exactly as trained |
| diffusers | `{kohya}` | diffusers drops `dora_scale`: a plain LoRA, not as trained |
| LyCORIS (sd-scripts `lycoris.kohya`, the LyCORIS extension) | `{kohya}` | exactly as trained |
| ComfyUI, Forge | `{kohya}` | loads on every layer, but ComfyUI divides by the norm of the base weight ‖W‖ instead of ‖W + dW‖: near the trained weights, not equal{comfy} |
| AUTOMATIC1111 | `{kohya}` | its DoRA normalises per input column, so it cannot reproduce this DoRA: the images differ from training{a1111} |
| sd-scripts `networks.lora` | `{kohya}` | has no DoRA: it ignores `dora_scale` (a plain LoRA) |

For output as trained, use diffusers with `{LORA_WEIGHTS}`, or a LyCORIS-based loader."""


def write_model_card(run_dir: str, cfg, family, *, model_id: str, steps: int, samples: list[str],
                     has_embeddings: bool, dora_deviation: Optional[dict] = None) -> str:
    """Writes ``README.md``; ``dora_deviation`` (``dora.dora_tool_deviation``) puts numbers into the DoRA table."""
    token_str = diffusers_trigger(cfg)
    name = cfg.run_name
    trigger_note = (f"The placeholder `{', '.join(cfg.abstractions)}` was replaced by the learnt tokens "
                    f"`{token_str}`: write `{token_str}` in diffusers prompts (with the embeddings loaded) and "
                    f"`{embedding_name(cfg)}` in A1111 / Forge (`embedding:{embedding_name(cfg)}` in ComfyUI)."
                    if has_embeddings else f"Trigger: `{', '.join(cfg.abstractions)}`.")
    from huggingface_hub import ModelCard, ModelCardData

    # ModelCardData writes the front matter with a YAML dumper: prompts with ':', '[' or '#' stay valid YAML.
    data = ModelCardData(
        base_model=model_id, license="openrail++", instance_prompt=cfg.instance_prompt,
        tags=["stable-diffusion" + ("-xl" if family.name == "sdxl" else ""), "lora", "dreambooth",
              "pivotal-tuning", "diffusers"] + (["dora"] if cfg.use_dora else []))
    gallery = "\n".join(f"![sample](samples/{os.path.basename(s)})" for s in samples[-4:])
    body = f"""# {name}

A DreamBooth {'DoRA' if cfg.use_dora else 'LoRA'} for `{model_id}` (rank {cfg.rank}, alpha {cfg.effective_alpha:g}, {steps} steps,
{cfg.optimizer.value}{', pivotal tuning' if has_embeddings else ''}).

{trigger_note}

{gallery}

## Files
{_files_section(cfg, family, has_embeddings)}

{_diffusers_section(cfg, family, has_embeddings, model_id)}

{_tools_section(cfg, family, has_embeddings)}{_dora_section(cfg, dora_deviation)}
"""
    path = os.path.join(run_dir, "README.md")
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(path)
    return path
