"""The picker inside the Generate tab: for the chosen run, the sweep grid (rows checkpoints, columns LoRA scales)
with the pick marked, the scores, the rule and why; "Use the pick" (on by default) makes Generate take the
picked checkpoint's files, and choosing a run sets the LoRA scale to the picked one. A finished run without a
sweep gets a button that runs it (``trainer.picking.run_sweep`` on the app's shared engine)."""
from __future__ import annotations

import os
from typing import Optional

import gradio as gr

from trainer import PickError, load_pick

TABLE_HEADERS = ["checkpoint", "scale", "likeness", "prompt fit", "keeps the prompt", "pick"]


def pick_rows(pick) -> list[list]:
    """One row per swept setting, the picked one marked."""
    rows = []
    for c in pick.record.get("cells", []):
        is_pick = (c["step"], c["scale"]) == (pick.step, pick.scale)
        rows.append([c["checkpoint"], c["scale"], round(c["likeness"], 4), round(c["prompt_fit"], 4),
                     "yes" if c["keeps_prompt"] else "no", "★" if is_pick else ""])
    return rows


def pick_summary(run_dir: Optional[str]) -> dict:
    """What the view shows for ``run_dir``: markdown, grid path, table rows, the scale to default to (None: keep
    the slider) and whether a sweep can be started."""
    if not run_dir or not os.path.isdir(run_dir):
        return {"md": "", "grid": None, "rows": [], "scale": None, "can_sweep": False}
    try:
        pick = load_pick(run_dir)
    except PickError as exc:
        return {"md": f"**The sweep's record is unusable:** {exc}", "grid": None, "rows": [], "scale": None,
                "can_sweep": True}
    if pick is None:
        return {"md": "No sweep yet for this run: **Find the best checkpoint and scale** renders every kept "
                      "checkpoint at several LoRA scales and scores the images with CLIP.",
                "grid": None, "rows": [], "scale": None, "can_sweep": True}
    md = (f"**Pick: {pick.checkpoint} at LoRA scale {pick.scale:g}** (marked in green).\n\n"
          f"Why: {pick.why}\n\nRule: {pick.rule_text}")
    return {"md": md, "grid": pick.grid_path, "rows": pick_rows(pick), "scale": pick.scale, "can_sweep": True}


def apply_pick(req, run_dir: str, use_pick: bool):
    """The Generate request of a run, with the picked checkpoint's LoRA and embeddings when ``use_pick`` and the
    run has a pick (the scale is the slider's, which choosing the run set to the pick's)."""
    if not use_pick:
        return req
    try:
        pick = load_pick(run_dir)
    except PickError as exc:
        raise gr.Error(str(exc))
    if pick is None:
        return req
    req.lora_path, req.embeddings_path = pick.lora_path, pick.embeddings_path
    return req


def build(ctx, run, lora_scale, run_dir_of) -> dict:
    """The view under the Generate form. ``run_dir_of(run_name, ws_id, request)`` -> the run folder or None."""
    with gr.Accordion("Best checkpoint and strength", open=True, elem_id="ls-pick"):
        use_pick = gr.Checkbox(True, label="Use the pick", info="Generate with the recommended checkpoint (off: the "
                               "run's final LoRA).", elem_id="ls-use-pick")
        info = gr.Markdown("", elem_id="ls-pick-info")
        with gr.Row():
            grid = gr.Image(None, label="Sweep: rows checkpoints, columns LoRA scales", type="filepath",
                            interactive=False, elem_id="ls-pick-grid", scale=3)
            table = gr.Dataframe(headers=TABLE_HEADERS, value=[], interactive=False, elem_id="ls-pick-table",
                                 scale=2)
        sweep_btn = gr.Button("Find the best checkpoint and scale", visible=False, elem_id="ls-pick-sweep")

    def outputs_for(run_dir, sid):
        s = pick_summary(run_dir)
        scale = s["scale"] if s["scale"] is not None else gr.Slider()  # no pick: the slider stays
        grid_v = ctx.served(sid, s["grid"]) if s["grid"] else None  # the session's own copy (ui/file_guard.py)
        return s["md"], grid_v, s["rows"], scale, gr.Button(visible=s["can_sweep"])

    def show(run_name, ws_id, request: gr.Request):
        return outputs_for(run_dir_of(run_name, ws_id, request), ctx.sid(ws_id, request))

    def sweep(run_name, ws_id, request: gr.Request, progress=gr.Progress()):
        from trainer.picking import SweepSettings, run_sweep
        from trainer.picking.scorer import ScorerError
        from trainer.picking.sweep import read_run_config

        run_dir = run_dir_of(run_name, ws_id, request)
        if not run_dir:
            raise gr.Error("Pick a finished run first.")
        if ctx.cuda and ctx.jobs.busy():
            raise gr.Error("The GPU is busy training; the sweep can run when it finishes.")
        try:
            cfg = read_run_config(run_dir)
            settings = SweepSettings(scales=cfg.pick_scale_values, seeds=tuple(range(cfg.pick_seeds)),
                                     clip_model=cfg.pick_clip_model)
            run_sweep(run_dir, settings, engine=ctx.engine.get(),
                      on_progress=lambda d, t, w: progress((d, t), desc=f"Sweep: {w}", unit="images"))
        except (PickError, ScorerError) as exc:
            raise gr.Error(str(exc))
        return outputs_for(run_dir, ctx.sid(ws_id, request))

    outs = [info, grid, table, lora_scale, sweep_btn]
    run.change(show, [run, ctx.ws_state], outs, api_name="show_pick")
    sweep_btn.click(sweep, [run, ctx.ws_state], outs, api_name="find_best", concurrency_id="gpu",
                    concurrency_limit=1)
    return {"use_pick": use_pick}
