"""Training-speed benchmark of the trainer (through the public ``train()``), optionally against diffusers'
advanced SDXL LoRA script.

    HF_HUB_OFFLINE=1 python bench/train_speed.py --model tiny-sdxl --steps 30 --warmup 5 --compare-caches
    HF_HUB_OFFLINE=1 python bench/train_speed.py --model real-sdxl --steps 30 --warmup 5 \
        --compare-reference ~/src/diffusers --rounds 3 --json results.json

It writes a small random dataset to a temp folder, trains ``warmup + steps`` optimizer steps at the LoRA Ease
configuration (pivotal tuning, Prodigy, min-SNR 5, rank 32; gradient checkpointing and bf16 on a GPU) and times
the steps from the ``Step`` events, leaving out the warm-up steps. It prints ONE table: steps/s, images/s, peak
memory (CUDA ``max_memory_allocated`` or the process's peak RSS on CPU), FLOPs per optimizer step (UNet forward +
backward with LoRA, counted with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device, so no memory or
time is spent) and MFU against the GPU's dense bf16 peak.

``real-sdxl`` / ``real-sd15`` are the real architectures with random weights (``bench/realarch.py``), built once
into the cache. The reference script is never vendored: pass the root of a diffusers checkout (or the script).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

REFERENCE_SCRIPT = os.path.join("examples", "advanced_diffusion_training", "train_dreambooth_lora_sdxl_advanced.py")

# Dense bf16 peak FLOP/s by device-name pattern (tensor cores, no sparsity).
PEAK_BF16 = [
    (r"H200", 989e12),
    (r"H100", 989e12),   # SXM; the PCIe card is ~756e12
    (r"A100", 312e12),
    (r"A10G", 125e12),
    (r"\bL4\b", 121e12),
    (r"RTX 4090|4090", 165e12),
]

# The LoRA Ease configuration (the HF "LoRA training scripts of the world, unite!" recipe as used by LoRA Ease):
# pivotal tuning with 2 new tokens, Prodigy at lr 1.0 for UNet and embeddings, min-SNR gamma 5.
LORA_EASE = dict(
    optimizer="prodigy", learning_rate=1.0, text_encoder_lr=1.0, adam_beta2=0.99, adam_weight_decay=0.01,
    adam_weight_decay_text_encoder=0.01, train_text_encoder_ti=True, train_text_encoder_ti_frac=0.5,
    token_abstraction="TOK", num_new_tokens_per_abstraction=2, snr_gamma=5.0, lr_scheduler="constant",
    lr_warmup_steps=0, repeats=1, seed=0,
)
INSTANCE_PROMPT = "a photo of TOK"
_WORDS = "red blue green garden beach city forest street sitting standing smiling portrait".split()


# ----------------------------------------------------------------------------------------------------------
def peak_flops(device_name: str):
    for pat, value in PEAK_BF16:
        if re.search(pat, device_name or ""):
            return value
    return None


def model_path(name: str) -> str:
    from trainer.families.loading import resolve

    if name in ("real-sdxl", "real-sd15"):
        from bench.realarch import real_model_path

        print(f"building/using the random-weight {name} (first time: minutes, ~7 GB disk for SDXL)",
              file=sys.stderr)
        return real_model_path(name)
    return resolve(name)


def family_info(path: str) -> tuple[str, int]:
    """(family name, default resolution) of a model folder."""
    with open(os.path.join(path, "model_index.json"), encoding="utf-8") as f:
        cls = json.load(f).get("_class_name", "")
    with open(os.path.join(path, "vae", "config.json"), encoding="utf-8") as f:
        size = int(json.load(f).get("sample_size") or 512)
    fam = "sdxl" if "XL" in cls else "sd"
    return fam, (size if fam == "sdxl" or size < 512 else 512)


def make_dataset(folder: str, n: int, resolution: int, captions: bool = True, seed: int = 0) -> str:
    """``n`` random RGB images (square, ``resolution`` px) with captions containing TOK (or none)."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        # smooth random colour fields (more image-like than white noise, compresses fast)
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((resolution, resolution), Image.BICUBIC).save(os.path.join(folder, f"{i:03d}.png"))
        if captions:
            with open(os.path.join(folder, f"{i:03d}.txt"), "w", encoding="utf-8") as f:
                f.write(f"a photo of TOK, {_WORDS[i % len(_WORDS)]} {_WORDS[(3 * i + 1) % len(_WORDS)]}")
    return folder


def bench_config(args, model: str, data: str, out: str, caches: bool, overrides: dict | None = None):
    """Our run's TrainConfig at the LoRA Ease configuration; ``overrides`` (TrainConfig fields) replace any of
    it, e.g. ``{"optimizer": "adamw8bit"}`` or ``{"mixed_precision": "fp16"}``."""
    from trainer import TrainConfig

    cuda = _cuda()
    fields = dict(
        pretrained_model_name_or_path=model, instance_data_dir=data, output_dir=out, instance_prompt=INSTANCE_PROMPT,
        resolution=args.resolution, train_batch_size=args.batch, gradient_accumulation_steps=1, rank=args.rank,
        max_train_steps=args.warmup + args.steps, checkpointing_steps=10 ** 7, cache_latents=caches,
        cache_text_embeddings=caches, gradient_checkpointing=cuda and not args.no_gradient_checkpointing,
        mixed_precision="bf16" if cuda else None, pretrained_vae_model_name_or_path=getattr(args, "vae", None),
        **LORA_EASE)
    fields.update(overrides or {})
    return TrainConfig.from_dict(fields).validate()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------------------------------------
LORA_TARGETS = "to_k,to_q,to_v,to_out.0"


def lora_unet(path: str, rank: int, targets: str = LORA_TARGETS, device: str = "meta"):
    """The model's UNet (from its config, no weights) with frozen base and trainable LoRA adapters."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    config = UNet2DConditionModel.load_config(path, subfolder="unet")
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=[t.strip() for t in targets.split(",") if t.strip()]))
    for n, p in unet.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    return unet


def unet_train_flops(path: str, batch: int, resolution: int, rank: int,
                     targets: str = LORA_TARGETS, device: str = "meta") -> int:
    """FLOPs of one training forward + backward of the UNet with LoRA adapters (frozen base: backward computes
    input gradients and the LoRA weight gradients) for ``batch`` images at ``resolution`` px; text encoders,
    VAE and optimizer are not counted. Runs on the meta device (no memory, no compute)."""
    return count_unet_step_flops(lora_unet(path, rank, targets, device), batch, resolution, device)


def count_unet_step_flops(unet, batch: int, resolution: int, device: str = "meta") -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    c = unet.config
    lat = resolution // 8
    cross = c.cross_attention_dim if isinstance(c.cross_attention_dim, int) else c.cross_attention_dim[0]
    with torch.device(device):
        x = torch.randn(batch, c.in_channels, lat, lat)
        t = torch.randint(0, 1000, (batch,))
        ctx = torch.randn(batch, 77, cross)
        added = None
        if c.addition_embed_type == "text_time":
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            added = {"text_embeds": torch.randn(batch, pooled), "time_ids": torch.randn(batch, 6)}
        target = torch.randn(batch, c.out_channels, lat, lat)
    counter = FlopCounterMode(display=False)
    with counter:
        pred = unet(x, t, ctx, added_cond_kwargs=added, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------------------
def run_ours(args, model: str, data: str, caches: bool, label: str, overrides: dict | None = None,
             on_event=None) -> dict:
    """One timed run of our trainer (``bench_config`` + ``overrides``); ``on_event`` sees every event."""
    from trainer.preflight import measure_run

    out = tempfile.mkdtemp(prefix="bench-run-")
    try:
        cfg = bench_config(args, model, data, out, caches, overrides)
        m = measure_run(cfg, warmup=args.warmup, on_event=on_event)
    except Exception as exc:  # a bad setting or dataset: one error row + its message, like a failed reference
        return {"run": label, "error": f"{type(exc).__name__}: {str(exc).strip()}"}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if m.oom:
        return {"run": label, "error": "out of memory"}
    sps = 1.0 / m.s_per_it
    return {"run": label, "steps_per_s": sps, "images_per_s": sps * cfg.train_batch_size * cfg.gradient_accumulation_steps,
            "s_per_it": m.s_per_it, "peak_bytes": m.process_peak_bytes, "peak_growth_bytes": m.peak_bytes,
            "peak_to_last_step_bytes": m.peak_to_last_step_bytes,
            "measured_steps": max(0, m.steps - args.warmup), "wall_s": m.wall_s, "overhead_s": m.overhead_s,
            "text_s_per_it": m.text_s_per_it, "frozen_s_per_it": m.frozen_s_per_it}


_LAUNCHER = r"""
import atexit, os, runpy, sys
def _peak():
    try:
        import torch
        if torch.cuda.is_available():
            print("__BENCH_PEAK__ %d" % torch.cuda.max_memory_allocated(), file=sys.stderr, flush=True)
        else:
            print("__BENCH_PEAK__ %d" % _vmhwm(), file=sys.stderr, flush=True)
    except Exception:
        pass
def _vmhwm():
    # this process's own peak RSS: getrusage's ru_maxrss would carry the parent's peak over fork + exec
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0
atexit.register(_peak)
def _steps_peak_hook():
    # The peak up to the step counter's last update (before the script's final save and inference), printed
    # once per progress bar when it reaches its total; host-side counters, no device sync.
    import tqdm.std
    update = tqdm.std.tqdm.update
    def wrapped(self, n=1):
        out = update(self, n)
        if self.total and self.n >= self.total and not getattr(self, "_bench_done", False):
            self._bench_done = True
            import torch
            if torch.cuda.is_available():
                mem = torch.cuda.max_memory_allocated()
            else:
                mem = _vmhwm()
            print("__BENCH_STEPS_PEAK__ %d %d" % (self.total, mem), file=sys.stderr, flush=True)
        return out
    tqdm.std.tqdm.update = wrapped
_steps_peak_hook()
standin = os.environ.get("LORA_STUDIO_TORCHVISION_STANDIN")
if standin:
    # Only the script's own `from torchvision import transforms` may see the stand-in: transformers finds
    # packages with importlib.util.find_spec and would then import torchvision.io, .transforms.v2, ... which
    # the stand-in does not have, so it is told first that torchvision is absent (as it is).
    import transformers.utils as _tu
    import transformers.utils.import_utils as _iu
    for _m in (_tu, _iu):
        for _n in ("is_torchvision_available", "is_torchvision_v2_available"):
            if hasattr(_m, _n):
                setattr(_m, _n, lambda *a, **k: False)
    sys.path.insert(0, standin)
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""
STANDIN = os.path.join(ROOT, "tests", "fixtures", "torchvision_standin")


def reference_env() -> tuple[dict, str | None]:
    """Environment of the reference subprocess, and a note when torchvision had to be stood in for: the script
    imports torchvision.transforms; where no torchvision imports (CPU machines whose torch has no matching
    torchvision wheel), the launcher puts tests/fixtures/torchvision_standin first on its sys.path. TQDM_MININTERVAL=0
    makes its progress bar print every step, so each step is timestamped when it ends (not up to 0.1 s later)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_MININTERVAL="0")
    probe = subprocess.run([sys.executable, "-c", "import torchvision.transforms"], capture_output=True, env=env)
    if probe.returncode == 0:
        return env, None
    env["LORA_STUDIO_TORCHVISION_STANDIN"] = STANDIN
    return env, ("torchvision does not import here, so the reference ran with tests/fixtures/torchvision_standin "
                 "(its image transforms run once, before timing, since latents are cached)")


def reference_args(args, script: str, model: str, data: str) -> list[str]:
    """The reference's command line at the LoRA Ease configuration. Its --output_dir is relative (the run's cwd
    is a temp folder): the script's final save writes f"{output_dir}/{output_dir}_emb.safetensors", which
    fails after training with an absolute path. Every local path given to it is made absolute for that cwd."""
    local = lambda p: os.path.abspath(p) if p and os.path.exists(p) else p  # noqa: E731 (a Hub id stays)
    script, model, data = local(script), local(model), local(data)
    a = ["--pretrained_model_name_or_path", model, "--instance_data_dir", data, "--instance_prompt", INSTANCE_PROMPT,
         "--output_dir", "ref-out", "--resolution", str(args.resolution), "--train_batch_size", str(args.batch),
         "--gradient_accumulation_steps", "1", "--max_train_steps", str(args.warmup + args.steps),
         "--checkpointing_steps", str(10 ** 7), "--rank", str(args.rank),
         "--mixed_precision", "bf16" if _cuda() else "no",
         "--optimizer", "prodigy", "--learning_rate", "1.0", "--text_encoder_lr", "1.0", "--adam_beta2", "0.99",
         "--adam_weight_decay", "0.01", "--adam_weight_decay_text_encoder", "0.01", "--train_text_encoder_ti",
         "--train_text_encoder_ti_frac", "0.5", "--token_abstraction", "TOK", "--num_new_tokens_per_abstraction",
         "2", "--snr_gamma", "5.0", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--repeats", "1",
         "--seed", "0", "--cache_latents"]
    if _cuda() and not args.no_gradient_checkpointing:  # the same rule as bench_config for ours
        a.append("--gradient_checkpointing")
    if getattr(args, "vae", None):
        a += ["--pretrained_vae_model_name_or_path", local(args.vae)]
    return [sys.executable, "-c", _LAUNCHER, script] + a


def failure_lines(tail: list[str], n: int = 5) -> list[str]:
    """The last ``n`` telling lines of a failed script's output: without the harness's own markers and the
    "Exception ignored in: <finalize ...>" blocks that interpreter shutdown prints after the real error."""
    keep, skipping = [], False
    for line in tail:
        if line.startswith("Exception ignored in"):
            skipping = True
        elif skipping and re.match(r"^\w+(Error|Exception)\b", line):
            skipping = False
        elif not skipping and line.strip() and not line.startswith("__BENCH_"):
            keep.append(line)
    return keep[-n:]


def run_reference(args, script: str, model: str, data: str, env: dict, label: str = "reference") -> dict:
    """Runs the reference script in a subprocess; steps/s from its tqdm counter ``k/N [`` timestamped on
    arrival (from the first update at or after the warm-up to the last), peak from max_memory_allocated (GPU)
    or the subprocess's peak RSS (CPU)."""
    out = tempfile.mkdtemp(prefix="bench-ref-")
    cmd = reference_args(args, script, model, data)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=out)
    marks: list[tuple[float, int]] = []
    peak, steps_peak = [None], [None]
    tail: list[str] = []
    total = args.warmup + args.steps

    def read(stream):
        buf = b""
        while True:
            chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096)
            if not chunk:
                break
            now = time.time()
            buf += chunk
            parts = re.split(rb"[\r\n]", buf)
            buf = parts.pop()
            for p in parts:
                line = p.decode("utf-8", "replace")
                tail.append(line)
                del tail[:-40]
                mk = re.search(r"(\d+)/(\d+) \[", line)
                if mk and int(mk.group(2)) == total:
                    k = int(mk.group(1))
                    if not marks or marks[-1][1] != k:
                        marks.append((now, k))
                pk = re.search(r"__BENCH_PEAK__ (\d+)", line)
                if pk:
                    peak[0] = int(pk.group(1))
                sp = re.search(r"__BENCH_STEPS_PEAK__ (\d+) (\d+)", line)
                if sp and int(sp.group(1)) == total:
                    steps_peak[0] = int(sp.group(2))

    threads = [threading.Thread(target=read, args=(s,), daemon=True) for s in (proc.stdout, proc.stderr)]
    for t in threads:
        t.start()
    rc = proc.wait()
    for t in threads:
        t.join()
    shutil.rmtree(out, ignore_errors=True)
    failure = f"exit {rc}: " + " | ".join(failure_lines(tail))[:600] if rc != 0 else None
    finished = bool(marks) and marks[-1][1] == total
    if failure and not finished:
        return {"run": label, "error": failure}
    after = [(t, k) for t, k in marks if k >= args.warmup]
    if len(after) < 2 or after[-1][1] == after[0][1]:
        return {"run": label, "error": "could not read the step counter from the script's progress bar"}
    (t0, k0), (t1, k1) = after[0], after[-1]
    sps = (k1 - k0) / (t1 - t0)
    res = {"run": label, "steps_per_s": sps, "images_per_s": sps * args.batch, "s_per_it": 1 / sps,
           "peak_bytes": peak[0], "peak_to_last_step_bytes": steps_peak[0], "measured_steps": k1 - k0}
    if failure:  # every step ran and was timed; the script failed afterwards (saving, its final inference)
        res["after_training"] = f"the reference finished its {total} steps, then failed: {failure}"
    return res


# ----------------------------------------------------------------------------------------------------------
def time_to_first_image(args, model: str, data: str, dtype=None) -> dict:
    """Trains a short run, then times Engine (``dtype``: the Engine's default when None): picking the finished
    run -> first image. Also says what the engine loaded (LoRA, embeddings, dtype) and whether the image has any
    variation (a NaN decode comes out as one flat colour)."""
    import numpy as np

    from generation import Engine, request_from_run
    from trainer import train

    out = tempfile.mkdtemp(prefix="bench-tti-")
    engine = None
    try:
        cfg = bench_config(args, model, data, out, True).replace(max_train_steps=2)
        train(cfg)
        t0 = time.perf_counter()
        engine = Engine(dtype=dtype)
        req = request_from_run(out, prompt="a photo of TOK", seed=0, steps=args.tti_steps,
                               width=args.resolution, height=args.resolution)
        res = engine.generate(req)
        seconds = time.perf_counter() - t0
        info = res.info if isinstance(res.info, dict) else {}
        return {"seconds": seconds, "images": len(res.images), "inference_steps": args.tti_steps,
                "timings": info.get("timings"), "dtype": info.get("dtype"), "size": info.get("size"),
                "lora": info.get("lora"), "embeddings": info.get("embeddings"),
                "pixel_std": float(np.asarray(res.images[0], dtype=np.float32).std()) if res.images else None}
    except Exception as exc:
        return {"skipped": f"failed: {type(exc).__name__}: {str(exc)[:300]}"}
    finally:
        if engine is not None:
            engine.release()
        shutil.rmtree(out, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
def fmt_num(x, digits=3):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def fmt_flops(x):
    if not x:
        return "n/a"
    for unit, v in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= v:
            return f"{x / v:.3g} {unit}"
    return f"{x:.3g} FLOP"


def fmt_mem(b, cuda: bool):
    from trainer.preflight import fmt_bytes

    return "n/a" if b is None else f"{fmt_bytes(b)} ({'GPU' if cuda else 'RSS'})"


COLUMNS = ["run", "model", "device", "steps/s", "images/s", "peak memory", "FLOPs/step", "MFU"]


def table(rows: list[dict], columns: list[str] = COLUMNS) -> str:
    cells = [columns] + [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    line = lambda row: "| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def median_result(results: list[dict]) -> dict:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[-1]
    out = dict(ok[0])
    for k in ("steps_per_s", "images_per_s", "s_per_it", "peak_bytes", "peak_to_last_step_bytes"):
        vals = [r[k] for r in ok if r.get(k) is not None]
        if vals:
            out[k] = statistics.median(vals)
    out["rounds"] = len(ok)
    out["steps_per_s_all"] = [r["steps_per_s"] for r in ok]
    return out


def fmt_load(load) -> str:
    return "n/a" if not load else "/".join(f"{v:.2f}" for v in load)


def paired_ratio(a: list[dict], b: list[dict], key: str) -> float:
    """Median over alternating rounds of a[i][key] / b[i][key] (pairs taken close in time cancel slow drifts
    of a shared machine's load)."""
    vals = [x[key] / y[key] for x, y in zip(a, b) if x.get(key) and y.get(key) and "error" not in x
            and "error" not in y]
    return statistics.median(vals) if vals else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-sdxl", help="tiny-sdxl | tiny-sd | real-sdxl | real-sd15 | PATH")
    p.add_argument("--steps", type=int, default=30, help="measured optimizer steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps, not measured")
    p.add_argument("--batch", type=int, default=None,
                   help="default: 2 (LoRA Ease) for real-sdxl / real-sd15, 1 for the tiny models (CI time)")
    p.add_argument("--resolution", type=int, default=None, help="default: the model's (tiny 64, SDXL 1024)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--images", type=int, default=4, help="images in the generated dataset")
    p.add_argument("--vae", metavar="PATH", help="a separate VAE for both trainers (--pretrained_vae_model_name_or_path; "
                   "a path containing 'fp16-fix' runs in the weight dtype)")
    p.add_argument("--no-cache", action="store_true", help="cache_latents and cache_text_embeddings off")
    p.add_argument("--compare-caches", action="store_true", help="run with and without caches; print the ratio")
    p.add_argument("--compare-reference", metavar="PATH",
                   help="diffusers checkout (or the script itself) to run " + REFERENCE_SCRIPT)
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of each compared run (median)")
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="(GPU) turn it off in both trainers")
    p.add_argument("--time-to-first-image", action="store_true")
    p.add_argument("--tti-steps", type=int, default=25, help="inference steps for --time-to-first-image")
    p.add_argument("--flops-device", default="meta", help="where FLOPs are counted (meta: no memory)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", metavar="PATH", help="write the numbers as JSON")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or (args.batch is not None and args.batch < 1):
        p.error("--steps and --batch must be >= 1 and --warmup >= 0")
    if args.warmup < 1:
        print("note: --warmup 0 times the first step too (model warm-up included)", file=sys.stderr)

    import torch
    import diffusers
    import peft
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    cuda = torch.cuda.is_available()
    dev = device_name()
    path = model_path(args.model)
    fam, default_res = family_info(path)
    args.resolution = args.resolution or default_res
    args.batch = args.batch or (2 if args.model.startswith("real-") else 1)
    work = tempfile.mkdtemp(prefix="bench-data-")
    messages: list[str] = []
    try:
        data = make_dataset(os.path.join(work, "captioned"), args.images, args.resolution, captions=True)
        runs: list[dict] = []
        ratios: dict[str, float] = {}

        if args.compare_reference:
            script = args.compare_reference
            if os.path.isdir(script):
                script = os.path.join(script, REFERENCE_SCRIPT)
            why = None
            if not os.path.isfile(script):
                why = (f"--compare-reference: {script} not found; pass the root of a diffusers checkout "
                       f"(git clone https://github.com/huggingface/diffusers) or the script itself; skipped")
            elif fam != "sdxl":
                why = "--compare-reference: the reference script trains SDXL; use an SDXL model; skipped"
            if why:
                messages.append(why)
                runs.append(run_ours(args, path, data, not args.no_cache, "ours"))
            else:
                # Same data for both: images only, every caption = the instance prompt (the script reads no .txt).
                plain = make_dataset(os.path.join(work, "plain"), args.images, args.resolution, captions=False)
                env, note = reference_env()
                if note:
                    messages.append(note)
                if not cuda:
                    messages.append("on CPU both run in fp32 without gradient checkpointing; the 1.5x / 0.7x "
                                    "targets are about the GPU run")
                ours, ref = [], []
                for r in range(args.rounds):
                    ours.append(run_ours(args, path, plain, True, "ours"))
                    ref.append(run_reference(args, script, path, plain, env))
                messages += sorted({x["after_training"] for x in ref if "after_training" in x})
                o, f = median_result(ours), median_result(ref)
                runs += [o, f]
                if "error" not in o and "error" not in f:
                    ratios["steps_per_s ours/reference"] = paired_ratio(ours, ref, "steps_per_s")
                    if o.get("peak_bytes") and f.get("peak_bytes"):
                        ratios["peak_memory ours/reference"] = paired_ratio(ours, ref, "peak_bytes")
                    if o.get("peak_to_last_step_bytes") and f.get("peak_to_last_step_bytes"):
                        ratios["peak_memory_to_last_step ours/reference"] = paired_ratio(
                            ours, ref, "peak_to_last_step_bytes")
        elif args.compare_caches:
            on, off = [], []
            for r in range(args.rounds):
                on.append(run_ours(args, path, data, True, "caches on"))
                off.append(run_ours(args, path, data, False, "caches off"))
            a, b = median_result(on), median_result(off)
            runs += [a, b]
            if "error" not in a and "error" not in b:
                ratios["steps_per_s caches on/off"] = paired_ratio(on, off, "steps_per_s")
        else:
            runs.append(run_ours(args, path, data, not args.no_cache,
                                 "caches off" if args.no_cache else "caches on"))

        try:
            flops = unet_train_flops(path, args.batch, args.resolution, args.rank, device=args.flops_device)
        except Exception as exc:  # a model whose UNet cannot run on meta
            messages.append(f"FLOPs not counted: {type(exc).__name__}: {str(exc)[:200]}")
            flops = None
        peak = peak_flops(dev) if cuda else None
        rows = []
        for r in runs:
            row = {"run": r["run"], "model": args.model, "device": dev}
            if "error" in r:
                row.update({"steps/s": "error", "images/s": "", "peak memory": r["error"][:80],
                            "FLOPs/step": fmt_flops(flops), "MFU": ""})
                messages.append(f"{r['run']}: {r['error']}")
            else:
                mfu = flops * r["steps_per_s"] / peak if (flops and peak) else None
                r["mfu"] = mfu
                row.update({"steps/s": fmt_num(r["steps_per_s"]), "images/s": fmt_num(r["images_per_s"]),
                            "peak memory": fmt_mem(r.get("peak_bytes"), cuda), "FLOPs/step": fmt_flops(flops),
                            "MFU": f"{100 * mfu:.1f}%" if mfu is not None else "n/a"})
            rows.append(row)
        tti = time_to_first_image(args, path, data) if args.time_to_first_image else None
    finally:
        shutil.rmtree(work, ignore_errors=True)

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"# load average before/after: {fmt_load(load_before)} / {fmt_load(load)} "
          f"(other processes slow CPU timings down)")
    print(f"# train_speed: {args.model} @ {args.resolution}px, batch {args.batch}, rank {args.rank}, "
          f"{args.steps} measured steps after {args.warmup} warm-up, LoRA Ease configuration"
          f"{' + gradient checkpointing, bf16' if cuda and not args.no_gradient_checkpointing else ''}")
    print(table(rows))
    for k, v in ratios.items():
        print(f"ratio {k}: {v:.3f}" + (f" (median of {args.rounds} alternating rounds)" if args.rounds > 1 else ""))
    if args.rounds > 1:
        for r in runs:
            if "steps_per_s_all" in r:
                print(f"  {r['run']}: steps/s per round " + ", ".join(f"{v:.3g}" for v in r["steps_per_s_all"]))
    stepped = [r for r in runs if r.get("peak_to_last_step_bytes")]
    if stepped:
        print("peak memory up to the last training step (before the final save): "
              + ", ".join(f"{r['run']} {fmt_mem(r['peak_to_last_step_bytes'], cuda)}" for r in stepped))
    if tti is not None:
        if "seconds" in tti:
            print(f"time to first image: {tti['seconds']:.2f} s ({tti['inference_steps']} inference steps, "
                  f"engine load included)")
        else:
            print(f"time to first image: skipped ({tti['skipped']})")
    for m in messages:
        print(f"note: {m}")
    if args.json:
        payload = {"args": vars(args), "model_path": path, "device": dev, "cuda": cuda,
                   "flops_per_step": flops, "peak_bf16_flops": peak, "runs": runs, "ratios": ratios,
                   "time_to_first_image": tti, "notes": messages, "load_average": [load_before, load],
                   "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                                "transformers": transformers.__version__, "peft": peft.__version__},
                   "date": time.strftime("%Y-%m-%d")}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2, default=str)
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
