"""The GPU table of issue #16 in one run: ours vs diffusers' advanced SDXL script at the LoRA Ease configuration,
ours with gradient checkpointing, 8-bit AdamW, fp16 and ``--compile_unet``, and every CUDA-only path once.

    bash bench/gpu_table.sh --reference .ref/diffusers          # one NVIDIA GPU (bench/README.md)
    bash bench/gpu_table.sh --dry-run                           # CPU, tiny-sdxl, a few steps per row (CI)

Run through ``bench/gpu_table.sh`` (it installs the carried wheels first). The timing, the reference launcher,
the FLOP count and the table come from ``bench/train_speed.py``; this file only chooses the rows, checks the
CUDA-only paths (text encoders offloaded after the pivot, ``torch.compile``, the bf16 Generate engine with a
LoRA, fp16) and prints the table last. On a GPU the model is the real SDXL architecture with random weights
(``bench/realarch.py``, built on the GPU) and a VAE shaped like madebyollin/sdxl-vae-fp16-fix.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import train_speed as ts  # noqa: E402
from bench.gpu_checks import (Events, bnb_import_error, compile_backend, constraint_mismatches,  # noqa: E402
                              describe_scaler, measured_matmul_flops, versions, watch_scaler)

FAKE_REFERENCE = os.path.join(ROOT, "tests", "fixtures", "fake_reference.py")
# The goal the table is read against (issue #16): on the same GPU, ours at >= 1.5x the reference's steps/s and
# <= 0.7x its peak memory.
GOAL_SPEED, GOAL_MEMORY = 1.5, 0.7
# Every row the table must have, in order; a row that cannot run says why instead of disappearing.
ROWS = ["ours", "reference", "ours + gradient checkpointing", "ours + 8-bit AdamW", "ours fp16", "ours + compile_unet"]
PATHS = ["offload after the pivot", "compile_unet", "bf16 engine + LoRA", "fp16 loss scale", "adamw8bit",
         "gradient checkpointing"]
COLUMNS = ["run", "steps/s", "images/s", "peak memory", "MFU", "notes"]
COMPILE_NEEDS_S = 150  # inductor's compile of the SDXL UNet's forward + backward, and the row's steps
# A GPU machine where the cut bitsandbytes wheel does not load: the second call that brings the published one.
BNB_FULL_HINT = ("bring the published wheel: BNB_FULL=1 bash bench/gpu_wheels.sh .whl-full, then bash "
                 "bench/gpu_table.sh --wheels .whl-full --rows 'ours + 8-bit AdamW' (carry .whl-full)")
ADAMW8BIT = {"optimizer": "adamw8bit", "learning_rate": 1e-4, "text_encoder_lr": 3e-4}  # AdamW's usual lrs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU: tiny-sdxl at 64 px, a few steps per row")
    p.add_argument("--reference", metavar="PATH", help="diffusers checkout or the script itself (dry run: the "
                   "stand-in tests/fixtures/fake_reference.py unless given)")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-table-out", help="table.md, results.json")
    p.add_argument("--steps", type=int, help="measured steps per run (GPU 16, dry run 2)")
    p.add_argument("--warmup", type=int, help="warm-up steps per run (GPU 4, dry run 1)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of ours / reference")
    p.add_argument("--budget-s", type=float, help="skip (and say so) rows that would start after this many "
                   "seconds (GPU default 450; the compile row needs 150 s left); 0: no budget")
    p.add_argument("--compile-backend", help="torch.compile backend (GPU inductor, dry run eager)")
    p.add_argument("--compile-pivot", action="store_true", help="compile row with pivotal tuning: two compiles "
                   "(before and after the pivot), measured after the pivot")
    p.add_argument("--tti-steps", type=int, default=4, help="inference steps of the engine check")
    p.add_argument("--rows", help="comma-separated rows (and 'bf16 engine + LoRA') to run; the others say "
                   "'not selected' (e.g. a second call for one row)")
    return p.parse_args(argv)


def prepare(args, work: str) -> tuple[str, str, argparse.Namespace]:
    """(model folder, fp16-fix-named VAE folder, train_speed arguments) for this run."""
    import torch

    if args.dry_run:
        from trainer.tiny import tiny_model_path

        model = tiny_model_path("tiny-sdxl")
        vae = os.path.join(work, "tiny-sdxl-vae-fp16-fix")  # the trainer's rule looks for "fp16-fix" in the path
        shutil.copytree(os.path.join(model, "vae"), vae)
        res = 64
    else:
        from bench.realarch import fp16_fix_vae_path, real_model_path

        model = real_model_path("real-sdxl", device="cuda")
        vae = fp16_fix_vae_path(device="cuda")
        res = 1024
        torch.cuda.empty_cache()
    dry = args.dry_run
    ts_args = argparse.Namespace(resolution=res, batch=2, rank=32, vae=vae, no_gradient_checkpointing=True,
                                 steps=args.steps or (2 if dry else 16), warmup=args.warmup or (1 if dry else 4),
                                 tti_steps=args.tti_steps)
    return model, vae, ts_args


def result_row(r: dict, flops, peak, cuda: bool, notes: str = "") -> dict:
    row = {"run": r["run"], "notes": notes}
    if "skipped" in r:
        row.update({"steps/s": "skipped", "notes": r["skipped"]})
    elif "error" in r:
        row.update({"steps/s": "error", "notes": r["error"][:200]})
    else:
        mfu = flops * r["steps_per_s"] / peak if flops and peak else None
        r["mfu"] = mfu
        row.update({"steps/s": ts.fmt_num(r["steps_per_s"]), "images/s": ts.fmt_num(r["images_per_s"]),
                    "peak memory": ts.fmt_mem(r.get("peak_bytes"), cuda),
                    "MFU": f"{100 * mfu:.2f}%" if mfu is not None else "n/a"})
    return row


def adamw8bit_outcome(r: dict, cuda: bool, bnb: str | None) -> str:
    """The 8-bit AdamW path line; turns the trainer's refusal (``--optimizer adamw8bit needs ...``) into a skip
    that says why: on a CPU, CUDA only; on a GPU, bitsandbytes did not import (``bnb``), and how to bring it."""
    if "error" in r and "adamw8bit needs" in r["error"]:  # the trainer refused it, in its words
        said = r.pop("error").split(": ", 1)[-1]
        r["skipped"] = (("CUDA only" + (f" (and bitsandbytes is absent: {bnb})" if bnb else "")
                         + "; here the trainer says: " + said) if not cuda
                        else f"bitsandbytes does not import here ({bnb}); the trainer says: {said}; {BNB_FULL_HINT}")
    elif "error" in r and bnb:
        r["error"] += f" (bitsandbytes: {bnb}; {BNB_FULL_HINT})"
    return ("ok" if "steps_per_s" in r else f"skipped: {r['skipped']}" if "skipped" in r
            else f"FAILED: {r['error'][:300]}")


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("bench/gpu_table.sh needs a CUDA GPU; on a CPU run it with --dry-run", file=sys.stderr)
        return 2
    if not cuda:
        torch.set_flush_denormal(True)  # CPU: denormal optimizer states slow steps 10-100x
        # The dry run checks paths, not speed: one thread each for ours and (through the environment it inherits)
        # the reference; on 2 busy cores two threads made a tiny step up to 10x slower.
        torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", "1")))
    budget = args.budget_s if args.budget_s is not None else (0 if args.dry_run else 450)
    backend = args.compile_backend or ("inductor" if cuda else "eager")
    from trainer.training.trainer import Trainer

    if not cuda:  # the same offload path as on a GPU (the class attribute tests use)
        Trainer.OFFLOAD_TEXT_ENCODERS_FROM = tuple(Trainer.OFFLOAD_TEXT_ENCODERS_FROM) + ("cpu",)
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpu-table-")
    try:
        return Session(args, work, cuda, budget, backend, t_start).run()
    finally:
        shutil.rmtree(work, ignore_errors=True)


class Session:
    """The rows and path checks of one gpu_table run, on one model, dataset and reference script."""

    def __init__(self, args, work: str, cuda: bool, budget: float, backend: str, t_start: float):
        self.args, self.cuda, self.budget, self.backend, self.t_start = args, cuda, budget, backend, t_start
        self.model, self.vae, self.a = prepare(args, work)
        self.built_s = time.time() - t_start
        self.data = ts.make_dataset(os.path.join(work, "plain"), 4, self.a.resolution, captions=False)
        self.dev = ts.device_name()
        self.flops = ts.unet_train_flops(self.model, self.a.batch, self.a.resolution, self.a.rank)
        self.peak = ts.peak_flops(self.dev) if cuda else None
        pins = os.path.join(ROOT, "constraints.txt")
        self.notes: list[str] = [f"version: {m}" for m in constraint_mismatches(pins)]  # a wheel that did not win
        self.matmul = None
        if cuda:
            try:
                self.matmul = measured_matmul_flops()
            except Exception as exc:  # the table matters more than this second ceiling
                self.notes.append(f"matmul rate not measured: {type(exc).__name__}: {str(exc)[:160]}")
        self.script, self.ref_note = args.reference, ""
        if self.script is None and args.dry_run:
            self.script = FAKE_REFERENCE
            self.ref_note = "stand-in script tests/fixtures/fake_reference.py, not diffusers'"
            os.environ.setdefault("FAKE_STEP_S", "0.05")
            os.environ.setdefault("FAKE_SAVE_S", "0.1")
        if self.script and os.path.isdir(self.script):
            self.script = os.path.join(self.script, ts.REFERENCE_SCRIPT)
        self.env, self.standin_note = ts.reference_env()
        self.selected = [r.strip() for r in args.rows.split(",")] if args.rows else None
        unknown = set(self.selected or ()) - set(ROWS) - {"bf16 engine + LoRA"}
        if unknown:
            raise SystemExit(f"--rows: unknown {sorted(unknown)}; choose from {ROWS + ['bf16 engine + LoRA']}")
        self.results: dict[str, list[dict]] = {name: [] for name in ROWS}
        self.recorders: dict[str, list[Events]] = {name: [] for name in ROWS}
        self.paths: dict[str, str] = {}

    def wanted(self, name: str, need_s: float = 0.0) -> bool:
        """Whether row (or check) ``name`` runs now; if not, its row says why (not selected, time budget)."""
        why = None
        if self.selected is not None and name not in self.selected:
            why = "not selected (--rows)"
        elif self.budget and time.time() - self.t_start + need_s > self.budget:
            why = f"time budget: {time.time() - self.t_start:.0f} s used of {self.budget:.0f} s"
        if why and name in self.results:
            self.results[name].append({"run": name, "skipped": why})
        elif why:
            self.paths[name] = f"skipped: {why}"
        return why is None

    def ours(self, name: str, overrides=None, run_args=None):
        rec = Events()
        self.recorders[name].append(rec)
        r = ts.run_ours(run_args or self.a, self.model, self.data, True, name, overrides, on_event=rec)
        self.results[name].append(r)
        print(f"row done: {name}: " + (r.get("error") or f"{r['steps_per_s']:.3g} steps/s, peak "
                                       f"{ts.fmt_mem(r.get('peak_bytes'), self.cuda)}"), flush=True)
        return r, rec

    def reference(self) -> None:
        if not self.script or not os.path.isfile(self.script):
            self.results["reference"] = [{"run": "reference", "error": f"no reference script at {self.script!r}: "
                                          "pass --reference <diffusers checkout> (bench/README.md)"}]
            return
        if self.standin_note and self.standin_note not in self.notes:
            self.notes.append(self.standin_note)
        r = ts.run_reference(self.a, self.script, self.model, self.data, self.env)
        self.results["reference"].append(r)
        print(f"row done: reference: {r.get('error') or format(r['steps_per_s'], '.3g') + ' steps/s'}", flush=True)

    def pair(self) -> None:
        """Ours and the reference, alternating, at the LoRA Ease configuration (no gradient checkpointing)."""
        run_ours, run_ref = self.wanted("ours"), self.wanted("reference")
        for _ in range(self.args.rounds):
            if run_ours:
                self.ours("ours")
            if run_ref:
                self.reference()
        offs = [e.offloaded_at for e in self.recorders["ours"]]
        where = "GPU" if self.cuda else "CPU (offload device added for the dry run)"
        if not offs:
            self.paths["offload after the pivot"] = "skipped: the ours row did not run"
        elif all(o is not None for o in offs):
            self.paths["offload after the pivot"] = (f"ok: text encoders moved off the {where} after step "
                                                     f"{offs[0]} in {len(offs)}/{len(offs)} runs")
        else:
            self.paths["offload after the pivot"] = (f"NOT SEEN in {sum(o is None for o in offs)}/{len(offs)} "
                                                     "runs (no 'cache_text' status)")

    def variants(self) -> None:
        """Ours with gradient checkpointing, 8-bit AdamW and fp16."""
        if self.wanted("ours + gradient checkpointing"):
            r, _ = self.ours("ours + gradient checkpointing", {"gradient_checkpointing": True})
            self.paths["gradient checkpointing"] = "ok" if "error" not in r else f"FAILED: {r['error'][:160]}"
        if self.wanted("ours + 8-bit AdamW"):
            r, _ = self.ours("ours + 8-bit AdamW", ADAMW8BIT)
            self.paths["adamw8bit"] = adamw8bit_outcome(r, self.cuda, bnb_import_error())
        if self.wanted("ours fp16"):
            with watch_scaler(cpu_standin=not self.cuda) as seen:
                r, rec = self.ours("ours fp16", {"mixed_precision": "fp16"})
            scale = (f"FAILED: {r['error'][:160]}" if "error" in r
                     else describe_scaler(seen, "the GPU" if self.cuda else "the CPU"))
            if rec.loss_scale:  # a scale the trainer itself reports, if it ever does
                scale += f"; the trainer reports {rec.loss_scale}"
            self.paths["fp16 loss scale"] = scale
            r["note"] = f"loss scale: {scale}"

    def engine(self) -> None:
        """The bf16 Generate engine with the LoRA (and embeddings) of a short run."""
        import torch

        name = "bf16 engine + LoRA"
        if not self.wanted(name):
            return
        tti = ts.time_to_first_image(self.a, self.model, self.data, dtype=torch.bfloat16)
        if "skipped" in tti:
            self.paths[name] = f"FAILED: {tti['skipped']}"
        else:
            ok = tti["dtype"] == "bfloat16" and tti["lora"] and tti["embeddings"] and tti["pixel_std"]
            self.paths[name] = (
                f"{'ok' if ok else 'FAILED'}: {tti['size'][0]}x{tti['size'][1]} image in {tti['seconds']:.1f} s "
                f"(load {tti['timings']['load_s']:.1f} s, {tti['inference_steps']} steps), dtype {tti['dtype']}, "
                f"LoRA {'loaded' if tti['lora'] else 'MISSING'}, embeddings "
                f"{'loaded' if tti['embeddings'] else 'MISSING'}, pixel std {tti['pixel_std']:.1f}")
        print(f"check done: {name}: {self.paths[name]}", flush=True)

    def compiled(self) -> None:
        """--compile_unet, last (the slowest to start). Without pivotal tuning: with it the UNet is compiled a
        second time at the pivot (the prompt embeddings stop requiring grad; ``--compile-pivot`` keeps it), which
        on a GPU costs another inductor compile of the SDXL UNet. So every step has cached prompt embeddings, as
        ours' steps after the pivot do, and the two rates compare."""
        name = "ours + compile_unet"
        c_args = argparse.Namespace(**vars(self.a))
        c_args.steps = max(2, self.a.steps // 2)
        overrides = {"compile_unet": True}
        if self.args.compile_pivot:
            c_args.warmup = c_args.steps + 4  # total = 2 x steps + 4: the pivot (frac 0.5) falls in the warm-up
        else:
            overrides["train_text_encoder_ti"] = False
        if not self.wanted(name, 0 if self.args.dry_run else COMPILE_NEEDS_S):
            self.paths["compile_unet"] = f"skipped: {self.results[name][-1]['skipped']}"
            return
        with compile_backend(self.backend) as graphs:
            r, _ = self.ours(name, overrides, c_args)
        frozen = [x["frozen_s_per_it"] for x in self.results["ours"] if x.get("frozen_s_per_it")]
        r["note"] = (("LoRA Ease, steps after the pivot only (both compiles in the warm-up)" if self.args.compile_pivot
                      else "no pivotal tuning (one compile), so prompt embeddings cached from step 1")
                     + f"; ours uncompiled after the pivot: "
                     f"{ts.fmt_num(1 / statistics.median(frozen)) if frozen else 'n/a'} steps/s")
        compiled = (f"backend {self.backend}, graphs compiled: {graphs['graphs']}, graph breaks: "
                    f"{graphs['graph_breaks']}, recompiles: {len(graphs['recompiles'])}"
                    + (f" (first: {graphs['recompiles'][0]})" if graphs["recompiles"] else ""))
        self.paths["compile_unet"] = f"ok: {compiled}" if "error" not in r else f"FAILED: {r['error'][:160]}"

    def run(self) -> int:
        self.pair()
        self.variants()
        self.engine()
        self.compiled()
        for p in PATHS:  # a check whose row was skipped says so
            self.paths.setdefault(p, "skipped: its row did not run (see the table)")
        return report(self)


def merge(name: str, runs: list[dict]) -> dict:
    """One row from a row's runs: the median of those that ran, else the (last) reason it did not."""
    ran = [r for r in runs if "steps_per_s" in r]
    if ran:
        return ts.median_result(ran)
    return runs[-1] if runs else {"run": name, "error": "row did not run"}


def report(se: Session) -> int:
    """Prints the header, the path checks, the table and the ratios (last), and writes table.md and
    results.json; 1 when a row or a check failed."""
    args, a, cuda, results, paths = se.args, se.a, se.cuda, se.results, se.paths
    rows, ratios = [], {}
    merged = {name: merge(name, rs) for name, rs in results.items()}
    for name in ROWS:
        r = merged[name]
        note = se.ref_note if name == "reference" and "steps_per_s" in r else r.get("note", "")
        if "rounds" in r and r["rounds"] > 1:
            note = (note + "; " if note else "") + "median of " + ", ".join(f"{v:.3g}" for v in r["steps_per_s_all"])
        rows.append(result_row(r, se.flops, se.peak, cuda, note))
    o, f = results["ours"], results["reference"]
    if merged["ours"].get("steps_per_s") and merged["reference"].get("steps_per_s"):
        ratios["steps_per_s ours/reference"] = ts.paired_ratio(o, f, "steps_per_s")
        ratios["peak_memory ours/reference"] = ts.paired_ratio(o, f, "peak_bytes")
        ratios["peak_memory_to_last_step ours/reference"] = ts.paired_ratio(o, f, "peak_to_last_step_bytes")
    v = versions()
    kind = "DRY RUN (tiny-sdxl at 64 px; checks the script, not the GPU targets)" if args.dry_run else "GPU run"
    lines = [f"# gpu_table {kind} {time.strftime('%Y-%m-%d %H:%M %Z')} on {se.dev}",
             "# versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
             f"# model: {'tiny-sdxl' if args.dry_run else 'real-sdxl (random weights)'} + VAE {a.vae}; "
             f"{a.resolution} px, batch {a.batch}, rank {a.rank}, LoRA Ease (Prodigy, pivotal 2 tokens, frac 0.5, "
             f"{'bf16' if cuda else 'fp32 on CPU'}, cached latents), {a.steps} measured steps after {a.warmup} "
             f"warm-up, {args.rounds} alternating rounds",
             f"# FLOPs/step (UNet fwd+bwd with LoRA, model FLOPs): {ts.fmt_flops(se.flops)}; MFU against "
             f"{ts.fmt_flops(se.peak) + '/s dense bf16 (datasheet)' if se.peak else 'n/a (no GPU peak known)'}"
             + (f"; measured bf16 8192^3 matmul here: {ts.fmt_flops(se.matmul)}/s" if se.matmul else ""),
             f"# model ready after {se.built_s:.0f} s; whole run {time.time() - se.t_start:.0f} s"]
    lines += [f"note: {n}" for n in se.notes]
    lines += [f"path {p}: {paths[p]}" for p in PATHS]
    lines.append(ts.table(rows, COLUMNS))
    for k, val in ratios.items():
        lines.append(f"ratio {k}: {val:.3f}")
    mfus = [f"{name} {100 * merged[name]['mfu']:.2f}%" + (
        f" ({100 * merged[name]['mfu'] * se.peak / se.matmul:.2f}% of the measured matmul rate)" if se.matmul else "")
        for name in ROWS if merged[name].get("mfu") is not None]
    lines.append(f"MFU (UNet model FLOPs x steps/s / {ts.fmt_flops(se.peak)}/s dense bf16; recomputation not "
                 f"counted): " + ", ".join(mfus) if mfus else "MFU: n/a (no GPU, or its bf16 peak is not known)")
    if "steps_per_s ours/reference" not in ratios:
        lines.append("ratio steps_per_s ours/reference: n/a (a run of the pair failed or did not run; see its row)")
    else:
        sp, mem = ratios["steps_per_s ours/reference"], ratios["peak_memory ours/reference"]
        scope = " (dry run: the goal is about the real model on a GPU, not this)" if args.dry_run else ""
        lines.append(f"goal >= {GOAL_SPEED}x steps/s: {'met' if sp >= GOAL_SPEED else 'NOT met'} ({sp:.2f}x); "
                     f"<= {GOAL_MEMORY}x peak memory: {'met' if mem <= GOAL_MEMORY else 'NOT met'} ({mem:.2f}x)"
                     f"{scope}")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as fh:
        json.dump({"rows": results, "paths": {p: paths[p] for p in PATHS}, "ratios": ratios, "versions": v,
                   "device": se.dev, "flops_per_step": se.flops, "peak_bf16_flops": se.peak,
                   "measured_matmul_flops": se.matmul, "args": vars(args),
                   "bench_args": vars(a), "date": time.strftime("%Y-%m-%d")}, fh, indent=2, default=str)
    failed = [r["run"] for r in merged.values() if "error" in r] + [p for p in PATHS if paths[p].startswith(
        ("FAILED", "NOT SEEN"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
