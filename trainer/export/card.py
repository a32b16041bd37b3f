"""``README.md``: the model card (base model, trigger, usage in diffusers, A1111 and ComfyUI, samples)."""
from __future__ import annotations

import os

from ..training.placeholders import replace_placeholders


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
    prompt = cfg.validation_prompt or cfg.instance_prompt
    if has_embeddings:
        prompt = replace_placeholders(prompt, tokens)
    gallery = "\n".join(f"![sample](samples/{os.path.basename(s)})" for s in samples[-4:])
    trigger_note = (f"The placeholder `{', '.join(cfg.abstractions)}` was replaced by the learnt tokens "
                    f"`{token_str}`: use `{token_str}` in prompts (diffusers) or the embedding name (A1111/ComfyUI)."
                    if has_embeddings else f"Trigger: `{', '.join(cfg.abstractions)}`.")
    from huggingface_hub import ModelCard, ModelCardData

    # ModelCardData writes the front matter with a YAML dumper: prompts with ':', '[' or '#' stay valid YAML.
    data = ModelCardData(
        base_model=model_id, license="openrail++", instance_prompt=cfg.instance_prompt,
        tags=["stable-diffusion" + ("-xl" if family.name == "sdxl" else ""), "lora", "dreambooth",
              "pivotal-tuning", "diffusers"])
    body = f"""# {name}

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
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(path)
    return path
