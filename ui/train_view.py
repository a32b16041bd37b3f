"""How a job looks on the Train tab: the progress bar, the loss plot's data, the learning-rate line."""
from __future__ import annotations

import html

import pandas as pd

from . import jobs as J


def _fmt_time(s) -> str:
    if s is None:
        return "?"
    s = int(round(float(s)))
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def loss_frame(s: dict) -> pd.DataFrame:
    """The plot's data: the training loss and, with --validation_loss_images, the held-out loss next to it."""
    rows = [[st, v, "training"] for st, v in s["losses"]] + [[st, v, "validation"] for st, v in s["val_losses"]]
    return pd.DataFrame(rows, columns=["step", "loss", "series"])


def progress_html(s: dict) -> str:
    state = s["state"]
    if state == "none":
        return "<div id='ls-progress'><div class='txt'>No training yet.</div></div>"
    total = s["total"] or 0
    pct = int(100 * s["step"] / total) if total else 0
    if state == J.QUEUED:
        text = f"Waiting in line: position {s['position']} (one training runs at a time on this machine)."
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
        text += f" · {html.escape(str(s['error']))}"
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
