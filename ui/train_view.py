"""How a job looks on the Train tab: the progress bar, the loss plot's data, the learning-rate line."""
from __future__ import annotations

import html
import os
import re

import pandas as pd

from trainer import describe_first_step
from trainer.families.loading import without_paths

from . import jobs as J


def _fmt_time(s) -> str:
    if s is None:
        return "?"
    s = int(round(float(s)))
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def smoothed(points: list, weight: float = 0.9) -> list:
    """An exponential moving average of [step, loss] points, debiased at the start (TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, (st, v) in enumerate(points):
        avg = weight * avg + (1 - weight) * float(v)
        out.append([st, avg / (1 - weight ** (i + 1))])
    return out


def loss_frame(s: dict) -> pd.DataFrame:
    """The plot's data: the raw training loss, its smoothed line over it and, with --validation_loss_images, the
    held-out loss next to them."""
    rows = [[st, v, "training"] for st, v in s["losses"]]
    rows += [[st, v, "smoothed"] for st, v in smoothed(s["losses"])]
    rows += [[st, v, "validation"] for st, v in s["val_losses"]]
    return pd.DataFrame(rows, columns=["step", "loss", "series"])


def as_sentence(error) -> str:
    """A failure as the page shows it: no exception class prefix ('TrainingError: ...'), flags in the form's
    words, first letter capitalised, ending with a full stop. Not escaped (the caller escapes once)."""
    from .train_form import in_form_words

    text = re.sub(r"^(?:[A-Za-z_.]*(?:Error|Exception)):\s*", "", str(error or "").strip())
    text = in_form_words(text).replace("**", "")
    if text and text[0].islower():
        text = text[0].upper() + text[1:]
    return text if not text or text[-1] in ".!?:" else text + "."


def progress_html(s: dict) -> str:
    state = s["state"]
    if state == "none":
        return "<div id='ls-progress'><div class='txt'>No training yet.</div></div>"
    total = s["total"] or 0
    pct = int(100 * s["step"] / total) if total else 0
    if state == J.QUEUED and s["position"] > 1:
        ahead = s["position"] - 1
        text = (f"Waiting in line: position {s['position']} ({ahead} training{'s' if ahead > 1 else ''} ahead; "
                "one runs at a time on this machine).")
    elif state == J.QUEUED:
        text = "Starting..."
    elif state == J.RUNNING and not s["step"]:
        text = "Preparing (reading images, loading the model, caching latents)..."
    else:
        text = f"{state.capitalize()} · step {s['step']}/{total}"
        if s["s_per_it"]:
            text += f" · {s['s_per_it']:.2f} s/it"
        if state == J.RUNNING and s["eta_s"] is not None:
            text += f" · ETA {_fmt_time(s['eta_s'])}"
        if s["loss"] is not None:
            text += f" · loss {s['loss']:.4f}"
    if state == J.FAILED and s["error"]:
        text += f" · {as_sentence(s['error'])}"
    if state in (J.INTERRUPTED, J.QUEUED) and s.get("notice"):
        text += f" · {s['notice']}"
    return (f"<div id='ls-progress' data-state='{state}'><div class='bar'><div class='fill' style='width:{pct}%'>"
            f"</div></div><div class='txt'><b>{html.escape(s['run'] or '')}</b> · {html.escape(text)}</div></div>")


def lr_md(s: dict) -> str:
    if s["lr"] is None:
        return ""
    out = f"Learning rate: `{s['lr']:.3g}`"
    if s["d_lr"] is not None:
        out += f" · effective (Prodigy d×lr): `{s['d_lr']:.3g}`"
    return out


# Seconds per step when this session has not measured any yet: the tiny demo models on a CPU, SD 1.x/2.x and
# SDXL on a 24 GB GPU at their own resolution, batch 1 (rough; the preflight measures the real figure at Start).
GUESS_S_PER_STEP = {"tiny": 1.0, "sd": 0.6, "sdxl": 1.5}


def run_length_md(steps: int, images: int, s_per_step, measured: bool, cpu_only: bool = False) -> str:
    """The line above Start: how long the run will be (steps, images, estimated time)."""
    if not images:
        return "**This run:** add images in the Dataset tab first."
    line = f"**This run:** {steps} steps on {images} image(s)"
    if cpu_only:
        return line + ", far too slow without a GPU (hours): use the tiny demo model here."
    how = "as measured in this session" if measured else "a rough estimate; the preflight measures it at Start"
    return line + f", about **{_fmt_time(steps * s_per_step)}** ({s_per_step:.2g} s/step, {how})."


# ----- the view of a job ---------------------------------------------------------------------------------------
def job_view(ctx, sid: str) -> dict:
    job = ctx.jobs.latest(sid)
    if job is not None:
        events, state, run, position = job.snapshot(), job.state, job.run_name, ctx.jobs.position(job)
        if job.resume:
            events = job.history + events
    else:
        runs = ctx.workspaces.list_runs(sid)
        if not runs:
            return {"state": "none", "run": None, "events": [], "position": 0}
        run = runs[0]
        state, events = J.run_state_from_disk(os.path.join(ctx.workspaces.runs_dir(sid), run))
        position = 0
    return {"state": state, "run": run, "events": events, "position": position}


def summarize(view: dict) -> dict:
    steps = [e for e in view["events"] if e.get("type") == "step"]
    last = steps[-1] if steps else {}
    samples, log = [], []
    loss = None  # the last loss read so far (the trainer reads it every --log_every steps)
    for e in view["events"]:
        t = e.get("type")
        if t == "step" and e.get("loss") is not None:
            loss = e["loss"]
        if t == "sample":
            samples += [(p, f"step {e.get('step')}") for p in e.get("images", []) if os.path.exists(p)]
        if t == "status":
            log.append(f"[{t}] {e.get('message')}")
        elif t == "started":
            log.append(f"[started] {e.get('num_images')} images, {e.get('total_steps')} steps"
                       + (f", resuming at step {e.get('start_step')}" if e.get("start_step") else "")
                       + "".join(f"\n  note: {n}" for n in e.get("notes", [])))
        elif t == "first_step":
            log.append(f"[first step] {describe_first_step(e)}")
        elif t == "checkpoint":
            log.append(f"[checkpoint] step {e.get('step')}")
        elif t == "picked":
            log.append(f"[pick] {e.get('checkpoint')} at LoRA scale {e.get('scale')}: {e.get('why')}")
        elif t == "sample":
            log.append(f"[sample] step {e.get('step')}: {len(e.get('images', []))} image(s)")
        elif t == "finished":
            log.append("[stopped] checkpoint kept; Resume continues from it" if e.get("stopped")
                       else f"[finished] step {e.get('step')}: " + ", ".join(sorted(e.get("artifacts", {}))))
        elif t == "failed":
            log.append(f"[failed] {as_sentence(without_paths(str(e.get('error'))))}" + (f"\n  advice: {e.get('advice')}" if e.get("advice")
                                                                     else ""))
        elif t == "step" and (e.get("step", 0) % 10 == 0 or e.get("step") == e.get("total")):
            log.append(f"step {e.get('step')}/{e.get('total')} loss {'-' if loss is None else round(loss, 4)}")
    return {
        "state": view["state"], "run": view["run"], "position": view["position"],
        "step": last.get("step", 0), "total": last.get("total", 0), "loss": loss,
        "lr": last.get("lr"), "d_lr": last.get("d_lr"), "s_per_it": last.get("s_per_it"), "eta_s": last.get("eta_s"),
        "losses": [[e["step"], e["loss"]] for e in steps if e.get("loss") is not None],
        "val_losses": [[e["step"], e["loss"]] for e in view["events"] if e.get("type") == "validation_loss"],
        "samples": samples, "log": log[-200:],
        "error": next((without_paths(str(e.get("error"))) for e in reversed(view["events"])  # no server folder
                       if e.get("type") == "failed"), None),
        # what the queue said to this session (e.g. after a restart: kept its place, or interrupted: Resume)
        "notice": next((e.get("message") for e in reversed(view["events"])
                        if e.get("type") == "status" and e.get("phase") == "queue"), None),
    }
