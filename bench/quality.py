"""Quality benchmark on the toy world (issue 15 part 3): the same 4 concept images, steps and 32 fixed seeds for
ours and each variant (pivotal tuning off, Prodigy vs AdamW, min-SNR on/off, prior preservation on/off) and,
with ``--compare-reference PATH`` (a diffusers checkout or the script), diffusers'
``train_dreambooth_lora_sdxl_advanced.py`` at the same settings. ONE table: concept hit rate ("a photo of TOK"
judged yellow circle), the LoRA alone with TOK as text, prior retention ("a photo of a red circle" judged red
circle), wall time of the training. Prodigy rows also report its d*lr over the token phase and how far the new
token rows moved (std ratio to the vocabulary rows; ~1.0 is their initialisation).

    HF_HUB_OFFLINE=1 python bench/quality.py [--steps 300] [--only ours,prodigy] [--compare-reference ~/diffusers]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

VARIANTS = {  # name -> overrides of trainer.toyworld.concept.toy_settings
    "ours": {},
    "pivotal off": dict(train_text_encoder_ti=False),
    "prodigy": dict(optimizer="prodigy", learning_rate=1.0, text_encoder_lr=1.0),
    "prodigy, no safeguard warm-up": dict(optimizer="prodigy", learning_rate=1.0, text_encoder_lr=1.0,
                                          prodigy_safeguard_warmup=False),
    "min-SNR 5": dict(snr_gamma=5.0),
    "prior preservation": dict(with_prior_preservation=True, num_class_images=24),
}


def token_phase(run_dir: str) -> dict:
    """Prodigy's d*lr at the start, middle and end of the token phase (from the Step events)."""
    from trainer.events import read_events

    steps = [e for e in read_events(os.path.join(run_dir, "events.jsonl")) if e.get("type") == "step"]
    tok = [e for e in steps if e.get("text_trainable")]
    d = [e.get("d_lr") for e in tok if e.get("d_lr") is not None]
    if not d:
        return {}
    return {"d_lr_first": d[0], "d_lr_mid": d[len(d) // 2], "d_lr_last": d[-1], "token_steps": len(tok)}


def token_movement(run_dir: str, model_dir: str) -> float:
    """std of the learnt clip_l rows / std of the base vocabulary rows."""
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    from trainer.toyworld.concept import embeddings_file

    rows = load_file(embeddings_file(run_dir))["clip_l"].float()
    vocab = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").get_input_embeddings().weight
    return float(rows.std() / vocab.detach().std())


def score(run_dir: str, pipe_judge, pivotal: bool = True) -> dict:
    from trainer.toyworld.concept import CONCEPT_HIT as CONCEPT, PRIOR_HIT as PRIOR, score_run
    from trainer.toyworld.measure import prompt_hit_rate

    if pivotal:
        s = score_run(run_dir, pipe_judge=pipe_judge)
        return dict(concept=s.concept, lora_only=s.lora_only, prior=s.prior, base_concept=s.base_concept,
                    base_prior=s.base_prior)
    pipe, judge = pipe_judge  # no embeddings: the LoRA learnt on "TOK" as text
    pipe.load_lora_weights(run_dir, weight_name="pytorch_lora_weights.safetensors")
    try:
        c = prompt_hit_rate(pipe, judge, "a photo of TOK", *CONCEPT, range(32))
        p = prompt_hit_rate(pipe, judge, "a photo of a red circle", *PRIOR, range(32))
    finally:
        pipe.unload_lora_weights()
    return dict(concept=c, lora_only=c, prior=p)


def run_variant(name: str, overrides: dict, data: str, classes: str, work: str, steps: int) -> dict:
    from trainer import train
    from trainer.config import TrainConfig
    from trainer.toyworld.concept import CLASS_PROMPT, toy_settings

    if overrides.get("with_prior_preservation"):
        overrides = dict(overrides, class_data_dir=classes, class_prompt=CLASS_PROMPT)
    out = os.path.join(work, name.replace(" ", "_").replace(",", ""))
    t0 = time.time()
    train(TrainConfig.from_sources(**toy_settings(data, out, max_train_steps=steps, **overrides)))
    return {"run": name, "dir": out, "wall_s": time.time() - t0,
            "pivotal": overrides.get("train_text_encoder_ti", True)}


def run_reference(script: str, model_dir: str, data: str, work: str, steps: int) -> dict:
    """diffusers' advanced script at the toy settings (AdamW, pivotal, rank 4), launched as bench/train_speed.py
    does (its torchvision stand-in, its launcher); its LoRA and embeddings stay in ``ref-out`` to be judged."""
    from bench import train_speed

    ns = argparse.Namespace(resolution=64, batch=1, warmup=0, steps=steps, rank=4, vae=None,
                            no_gradient_checkpointing=True)
    cmd = train_speed.reference_args(ns, script, model_dir, data)
    for i, a in enumerate(cmd):  # our toy settings instead of its LoRA Ease ones
        if a == "--optimizer":
            cmd[i + 1] = "adamw"
        if a == "--learning_rate":
            cmd[i + 1] = "2e-4"
        if a == "--text_encoder_lr":
            cmd[i + 1] = "1e-2"
        if a == "--snr_gamma":  # min-SNR off, as in ours
            cmd[i], cmd[i + 1] = "--adam_beta1", "0.9"
    env, _note = train_speed.reference_env()
    cwd = os.path.join(work, "reference")
    os.makedirs(cwd, exist_ok=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    out = os.path.join(cwd, "ref-out")
    if proc.returncode != 0 and not os.path.exists(os.path.join(out, "pytorch_lora_weights.safetensors")):
        return {"run": "diffusers advanced script", "error": train_speed.failure_lines(proc.stderr.splitlines())}
    return {"run": "diffusers advanced script", "dir": out, "wall_s": wall, "pivotal": True}


def table(rows: list[dict]) -> str:
    head = "| run | concept hit | LoRA alone (TOK as text) | prior kept | train wall s | Prodigy d*lr over the token phase | token rows std / vocab |"
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | error: {r['error']} | | | | | |")
            continue
        tp = r.get("token_phase") or {}
        d = (f"{tp['d_lr_first']:.1e} -> {tp['d_lr_mid']:.1e} -> {tp['d_lr_last']:.1e}" if tp else "n/a")
        mv = f"{r['movement']:.2f}" if r.get("movement") is not None else "n/a"
        lines.append(f"| {r['run']} | {r['concept']:.2f} | {r['lora_only']:.2f} | {r['prior']:.2f} | "
                     f"{r['wall_s']:.0f} | {d} | {mv} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--only", default=None, help="comma list of variants (default: all)")
    p.add_argument("--compare-reference", metavar="PATH", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from trainer.tiny import tiny_model_path
    from trainer.toyworld.concept import write_class_images, write_concept_images
    from trainer.toyworld.measure import load_toy

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    model_dir = tiny_model_path("toy-sdxl")
    pipe_judge = load_toy(model_dir)
    work = tempfile.mkdtemp(prefix="bench-quality-")
    data = write_concept_images(os.path.join(work, "concept"))
    classes = write_class_images(os.path.join(work, "class"))
    names = args.only.split(",") if args.only else list(VARIANTS)
    rows = []
    try:
        base = None
        for name in names:
            r = run_variant(name, dict(VARIANTS[name]), data, classes, work, args.steps)
            r.update(score(r["dir"], pipe_judge, pivotal=r["pivotal"]))
            base = base or {k: r[k] for k in ("base_concept", "base_prior") if k in r}
            if VARIANTS[name].get("optimizer") == "prodigy":
                r["token_phase"] = token_phase(r["dir"])
            if r["pivotal"]:
                r["movement"] = token_movement(r["dir"], model_dir)
            rows.append(r)
            print(f"{name}: {json.dumps({k: v for k, v in r.items() if k != 'dir'})}", flush=True)
        if args.compare_reference:
            script = args.compare_reference
            if os.path.isdir(script):
                from bench.train_speed import REFERENCE_SCRIPT

                script = os.path.join(script, REFERENCE_SCRIPT)
            # the script reads no .txt captions: every image gets the instance prompt, as ours does here
            r = run_reference(script, model_dir, data, work, args.steps)
            if "error" not in r:
                r.update(score(r["dir"], pipe_judge))
                r["movement"] = token_movement(r["dir"], model_dir)
            rows.append(r)
        print(table(rows))
        if base:
            print(f"base model: concept {base.get('base_concept', float('nan')):.2f}, "
                  f"prior {base.get('base_prior', float('nan')):.2f} (32 seeds)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump([{k: v for k, v in r.items() if k != "dir"} for r in rows], f, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
