"""``toy-sdxl``: an SDXL-shaped pipeline (two CLIP text encoders, a ``text_time`` UNet) pretrained on the toy world
until it draws the named colour and shape, with the constructed VAE and the judge in the same folder.

Pretraining set: {red, green, blue} x {circle, square, triangle}, captions "a photo of a red circle" (70%),
"a photo of a circle" (20%) and "" (10%, for classifier-free guidance; the pipeline's negative prompt is the
encoded "" as ``force_zeros_for_empty_prompt`` is off). The text encoders and the UNet train jointly (AdamW,
warm-up + cosine), with the time ids of a 64 px image (64, 64, 0, 0, 64, 64). Deterministic; the cache folder is
named by the content hash of this package's sources (``toy_cache_name``), so a code change rebuilds it.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import torch

from ..clip_vocab import write_clip_tokenizer_files
from .judge import save_judge, train_judge
from .render import BASE_COLOURS, BASE_SHAPES, COLOURS, SHAPES, SIZE, render_set
from .vae import build_vae, encode

TOY_SDXL = "toy-sdxl"
WORDS = ("a photo of the on an red green blue yellow circle square triangle plus shape painting beach").split()
TIME_IDS = (SIZE, SIZE, 0, 0, SIZE, SIZE)
# Two phases (the second with a fresh optimizer at half the rate): the first alone reached a loss of 0.068 and
# drew the named colour and shape in only 37% of samples.
SETTINGS = dict(steps=300, batch=64, lr=2e-3, warmup=30, n_each=260, seed=0, steps2=300, lr2=1e-3, warmup2=10)


BUILD_SOURCES = ("render.py", "vae.py", "judge.py", "base.py", "../clip_vocab.py")


def toy_cache_name() -> str:
    """``toy-sdxl-<hash>``: the hash of the settings and of the sources the build runs (``BUILD_SOURCES``)."""
    h = hashlib.sha256(json.dumps(SETTINGS, sort_keys=True).encode())
    here = os.path.dirname(os.path.abspath(__file__))
    for name in BUILD_SOURCES:
        with open(os.path.join(here, name), "rb") as f:
            h.update(f.read())
    return f"{TOY_SDXL}-{h.hexdigest()[:12]}"


def _text_encoder(vocab: int, tok, with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=32, hidden_act="gelu",
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _unet(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=SIZE // 8, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=64, norm_num_groups=16, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32)


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, prediction_type="epsilon", timestep_spacing="leading",
                                  steps_offset=1)


def encode_prompts(encoders, tok, prompts: list[str], ids_cache: dict | None = None):
    """(prompt_embeds [N, 77, 64], pooled [N, 32]) exactly as StableDiffusionXLPipeline.encode_prompt computes them."""
    if ids_cache is None:
        ids_cache = {}
    for p in prompts:
        if p not in ids_cache:  # the tokenizer is pure Python: once per caption, not per step
            ids_cache[p] = tok([p], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids = torch.cat([ids_cache[p] for p in prompts])
    embeds, pooled = [], None
    for te in encoders:
        out = te(ids, output_hidden_states=True)
        pooled = out[0]
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, -1), pooled


def _captions(labels, rng: np.random.Generator) -> list[str]:
    out = []
    for colour, shape in labels:
        u = rng.random()
        out.append(f"a photo of a {colour} {shape}" if u < 0.7 else f"a photo of a {shape}" if u < 0.9 else "")
    return out


def pretrain(unet, encoders, tok, latents, labels, steps: int, batch: int, lr: float, warmup: int, seed: int,
             log=None) -> list[float]:
    """Joint training of the UNet and both text encoders on (latents, labels); returns the loss per step."""
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(_scheduler().config)
    params = list(unet.parameters()) + [p for te in encoders for p in te.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, fused=True)  # one kernel: per-step overhead dominates
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps))))
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    time_ids = torch.tensor([TIME_IDS], dtype=torch.float32).repeat(batch, 1)
    losses, ids_cache = [], {}
    for m in [unet, *encoders]:
        m.train()
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        caps = _captions([labels[i] for i in idx.tolist()], rng)
        uniq = sorted(set(caps))
        embeds, pooled = encode_prompts(encoders, tok, uniq, ids_cache)
        pick = torch.tensor([uniq.index(c) for c in caps])
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        pred = unet(noise_sched.add_noise(x0, noise, t), t, embeds[pick],
                    added_cond_kwargs={"text_embeds": pooled[pick], "time_ids": time_ids}).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log and (step + 1) % 100 == 0:
            log(f"toy-sdxl pretraining {step + 1}/{steps}: loss {np.mean(losses[-100:]):.4f}")
    for m in [unet, *encoders]:
        m.eval()
    return losses


def build_toy_sdxl(out: str, tmp: str, log=print) -> None:
    """Builds the whole toy world into ``out``: the pipeline (diffusers folder), ``judge.safetensors`` and
    ``toyworld.json`` (what was built and measured, with timings)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    torch.set_flush_denormal(True)  # late AdamW states turn denormal on CPUs: 10-100x slower steps otherwise
    t0 = time.time()
    s = SETTINGS
    tok_dir = os.path.join(tmp, "_tok_src")
    n = write_clip_tokenizer_files(tok_dir, WORDS)
    tok = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    vae = build_vae()
    t_vae = time.time() - t0
    judge, judge_acc = train_judge(vae)
    t_judge = time.time() - t0 - t_vae
    images, labels = render_set([(c, sh) for c in BASE_COLOURS for sh in BASE_SHAPES], s["n_each"], s["seed"])
    latents = encode(vae, images)
    encoders = [_text_encoder(n, tok, False, seed=1), _text_encoder(n, tok, True, seed=2)]
    unet = _unet(seed=3)
    t1 = time.time()
    losses = pretrain(unet, encoders, tok, latents, labels, s["steps"], s["batch"], s["lr"], s["warmup"], s["seed"],
                      log=log)
    losses += pretrain(unet, encoders, tok, latents, labels, s["steps2"], s["batch"], s["lr2"], s["warmup2"],
                       s["seed"] + 1, log=log)
    t_pre = time.time() - t1
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tok,
                                     tokenizer_2=tok, unet=unet, scheduler=_scheduler(),
                                     force_zeros_for_empty_prompt=False)
    pipe.save_pretrained(out)
    save_judge(judge, out)
    facts = dict(settings=s, colours=list(COLOURS), shapes=list(SHAPES), base_colours=list(BASE_COLOURS),
                 base_shapes=list(BASE_SHAPES), judge=judge_acc, final_loss=float(np.mean(losses[-100:])),
                 seconds=dict(vae=round(t_vae, 1), judge=round(t_judge, 1), pretrain=round(t_pre, 1),
                              total=round(time.time() - t0, 1)))
    with open(os.path.join(out, "toyworld.json"), "w", encoding="utf-8") as f:
        json.dump(facts, f, indent=1)
    log(f"toy-sdxl built in {facts['seconds']['total']} s: {facts}")
