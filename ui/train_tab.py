"""Train tab: concept preset + every TrainConfig field, Start/Stop/Resume, live progress, loss plot, samples."""
from __future__ import annotations

import html
import inspect
import os
import shutil
from dataclasses import fields
from enum import Enum

import gradio as gr
import pandas as pd

from trainer import (ConfigError, TrainConfig, coerce_field, describe_first_step, field_type, load_preset, preset_info,
                     replace_word)

from trainer.families.loading import without_paths

from . import jobs as J, run_submit
from .allowlist import VISITOR_FIELDS, VisitorError, check_request, check_total_steps
from .dataset_files import add_trigger, cards_of, lacking_trigger, read_records, rename_trigger, save_records
from .dataset_store import edit_lock
from .run_submit import SubmitError, freeze_for_run
from .sessions import safe_run_name
from .train_view import _fmt_time, loss_frame, lr_md, progress_html  # noqa: F401 (loss_frame: tests)

GROUP_TITLES = {"model": "Model", "data": "Data", "prior": "Prior preservation", "text": "Pivotal tuning / text",
                "lora": "LoRA", "optim": "Optimizer", "schedule": "Schedule & precision",
                "output": "Output, checkpoints, samples", "general": "General"}
CONCEPTS = ["face", "style", "object", "custom"]


def adv_fields():
    """The Advanced form: the visitor-settable fields of ``ui/allowlist.py``, in TrainConfig order."""
    return [f for f in fields(TrainConfig) if f.name in VISITOR_FIELDS]


ADV = adv_fields()
ADV_NAMES = [f.name for f in ADV]


# ----- values <-> components ---------------------------------------------------------------------------------
def to_ui(name: str, value):
    t, optional = field_type(name)
    if isinstance(value, Enum):
        value = value.value
    if t in (int, float):
        if optional:  # an empty box means "the default"; a gr.Number cannot be empty in the browser
            return "" if value is None else (repr(value) if t is float else str(value))
        return value
    if t is bool:
        return bool(value)
    return "" if value is None else str(value)


def from_ui(name: str, value):
    t, optional = field_type(name)
    if isinstance(value, str) and value.strip() == "" and optional:
        return None
    if t is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# What the app sets on top of every preset: the preflight measures a few steps first and fits the run to the
# GPU's memory (gradient checkpointing, smaller batch with accumulation, ...), then says what it chose.
APP_DEFAULTS = {"auto_fit": True}


def preset_ui_values(concept: str) -> dict:
    cfg = TrainConfig.from_dict({**APP_DEFAULTS, **load_preset(concept)})
    return {n: to_ui(n, getattr(cfg, n)) for n in ADV_NAMES}


def same(a, b, name: str = "") -> bool:
    if name:
        try:
            a, b = coerce_field(name, from_ui(name, a)), coerce_field(name, from_ui(name, b))
        except Exception:
            pass
    if a in (None, "") and b in (None, ""):
        return True
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(a)), abs(float(b)))
    return a == b


def apply_preset(concept: str, current: dict, last_applied: dict) -> tuple[dict, dict, list[str]]:
    """(new values, new last-applied, kept field names): fields the user changed by hand are kept."""
    new = preset_ui_values(concept)
    kept = [n for n in ADV_NAMES if n in current and n in last_applied and not same(current[n], last_applied[n], n)]
    out = {n: (current[n] if n in kept else new[n]) for n in ADV_NAMES}
    return out, new, kept


def make_component(f, value):
    name, meta = f.name, f.metadata
    t, optional = field_type(name)
    kw = dict(label=name, info=meta.get("help"), elem_id=f"adv-{name}", value=value)
    if t is bool:
        return gr.Checkbox(**kw)
    if isinstance(t, type) and issubclass(t, Enum):
        choices = ([""] if optional else []) + [m.value for m in t]
        return gr.Dropdown(choices=choices, **kw)
    if meta.get("choices"):
        choices = ["" if c is None else c for c in meta["choices"]]
        return gr.Dropdown(choices=choices, **kw)
    if t in (int, float) and optional:
        return gr.Textbox(placeholder="empty = default", **kw)
    if t is int:
        return gr.Number(precision=0, **kw)
    if t is float:
        return gr.Number(**kw)
    return gr.Textbox(**kw)


def format_config_error(err: ConfigError) -> str:
    rows = ["| field | value | what is accepted |", "|---|---|---|"]
    for e in err.errors:
        val = repr(e.value).replace("|", "\\|").replace("`", "'")
        rows.append(f"| `{e.name}` | `{val}` | {e.message.replace('|', chr(92) + '|')} |")
    return "**Error:** **The settings need a fix before training can start:**\n\n" + "\n".join(rows)


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
            log.append(f"[failed] {without_paths(str(e.get('error')))}"
                       + (f"\n  advice: {e.get('advice')}" if e.get("advice") else ""))
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


# ----- the tab --------------------------------------------------------------------------------------------------
def build(ctx) -> dict:
    ws = ctx.ws_state
    concept = ctx.components["concept"]
    trigger = ctx.components["trigger"]
    base_model = ctx.components["base_model"]

    with gr.Row():
        run_name = gr.Textbox("my-lora", label="Run name", elem_id="ls-run-name", scale=2)
        base_model.render()
    if not ctx.cuda:
        gr.Markdown("**No GPU found on this machine**, so the tiny demo model (`tiny-sdxl`) is selected: it "
                    "runs the whole flow in seconds but learns nothing useful. Use a GPU for real LoRAs.",
                    elem_classes=["ls-notice"], elem_id="ls-nogpu")
    preset_msg = gr.Markdown("", elem_id="ls-preset-msg")
    init = preset_ui_values("face")
    last_applied = gr.State(dict(init))
    comps: dict[str, gr.components.Component] = {}
    with gr.Accordion("Advanced: every setting (filled by the concept's preset)", open=False, elem_id="ls-advanced"):
        groups: dict[str, list] = {}
        for f in ADV:
            groups.setdefault(f.metadata.get("group", "general"), []).append(f)
        for g, fs in groups.items():
            with gr.Accordion(GROUP_TITLES.get(g, g.capitalize()), open=(g == "schedule")):
                for i in range(0, len(fs), 3):
                    with gr.Row():
                        for f in fs[i:i + 3]:
                            comps[f.name] = make_component(f, init[f.name])
    adv_list = [comps[n] for n in ADV_NAMES]

    with gr.Row():
        start_btn = gr.Button("Start training", variant="primary", elem_id="ls-start")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="ls-stop")
        resume_btn = gr.Button("Resume", elem_id="ls-resume")
    status = gr.Markdown("", elem_id="ls-train-status")
    fix_btn = gr.Button("Add the trigger to the captions", visible=False, variant="primary", elem_id="ls-fix-trigger")
    progress = gr.HTML(progress_html({"state": "none"}), elem_id="ls-progress-box")
    lr_box = gr.Markdown("", elem_id="ls-lr")
    with gr.Row():
        loss_plot = gr.LinePlot(loss_frame({"losses": [], "val_losses": []}), x="step", y="loss", color="series",
                                label="Loss", elem_id="ls-loss", height=260, scale=3)
        samples = gr.Gallery(label="Validation samples", columns=4, height=260, elem_id="ls-samples", scale=2)
    log = gr.Textbox(label="Log", lines=8, max_lines=8, autoscroll=True, elem_id="ls-log", interactive=False)
    status_json = gr.JSON(visible=False)
    timer = gr.Timer(1.0, active=False)

    # -- concept -> preset (hand-edited fields kept) --
    def set_concept(concept_v, *args):
        *vals, last = args
        current = dict(zip(ADV_NAMES, vals))
        out, new_last, kept = apply_preset(concept_v, current, last or init)
        info = preset_info(concept_v)
        msg = f"**{info.get('label', concept_v)}** preset applied. {info.get('description', '').strip()}"
        if kept:
            msg += "\n\nKept your own values for: " + ", ".join(f"`{k}` = {out[k]}" for k in kept)
        return [out[n] for n in ADV_NAMES] + [new_last, msg]

    set_concept.__signature__ = inspect.Signature(
        [inspect.Parameter("concept", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ADV_NAMES]
        + [inspect.Parameter("last_applied", inspect.Parameter.POSITIONAL_OR_KEYWORD)])
    concept.change(set_concept, [concept] + adv_list + [last_applied], adv_list + [last_applied, preset_msg],
                   api_name="set_concept")

    # -- start / stop / resume --
    def view_outputs(sid):
        s = summarize(job_view(ctx, sid))
        df = loss_frame(s)
        brief = {k: v for k, v in s.items() if k not in ("losses", "val_losses", "samples", "log")}
        brief["num_losses"], brief["num_samples"] = len(s["losses"]), len(s["samples"])
        brief["num_val_losses"] = len(s["val_losses"])
        active = s["state"] in J.ACTIVE
        shown = ctx.served(sid, s["samples"])  # the session's own copies (ui/file_guard.py)
        return [progress_html(s), lr_md(s), df, "\n".join(s["log"]), shown, brief, gr.Timer(active=active)]

    view_comps = [progress, lr_box, loss_plot, log, samples, status_json, timer]

    def start(*args):
        out = _start(*args)
        fix = out.pop() if len(out) > len(view_comps) + 1 else None
        return out + [gr.update(visible=True, value=fix) if fix else gr.update(visible=False)]

    def _start(run_name_v, concept_v, trigger_v, base_v, *args):
        *vals, ws_id, request = args
        sid = ctx.sid(ws_id, request)
        folder = ctx.workspaces.uploads_dir(sid)
        with edit_lock(folder):  # one dataset edit at a time (ui/dataset_store.py)
            rename_trigger(folder, (trigger_v or "TOK").strip())  # a trigger typed just before Start (blur races)
            recs = read_records(folder)
            if not recs:
                return ["**Error:** The dataset is empty: add images in the Dataset tab first."] + view_outputs(sid)
            save_records(folder, recs)
        trig = (trigger_v or "TOK").strip()
        values = {n: from_ui(n, v) for n, v in zip(ADV_NAMES, vals)}
        try:
            check_request({**values, "pretrained_model_name_or_path": base_v}, ctx.policy)
        except VisitorError as e:
            return [f"**Error:** {e}"] + view_outputs(sid)
        if trig != "TOK":
            for k in ("instance_prompt", "validation_prompt", "class_prompt"):
                if isinstance(values.get(k), str):
                    values[k] = replace_word(values[k], "TOK", trig)
        if values.get("train_text_encoder_ti"):
            # Pivotal tuning learns the trigger from the captions: one without it never teaches the new tokens.
            missing = lacking_trigger(recs, trig, values.get("instance_prompt") or "")
            if missing:
                names = ", ".join(f"`{r.source_name}`" for r in missing[:3]) + (" ..." if len(missing) > 3 else "")
                return [f"**Error:** {len(missing)} of {len(recs)} caption(s) do not contain the trigger word "
                        f"`{trig}` ({names}). Pivotal tuning learns `{trig}` from the captions, so these images "
                        f"would never teach it. Click the button below to add it, or edit the captions in the "
                        "Dataset tab."] + view_outputs(sid) + [f"Add '{trig}' to {len(missing)} caption(s)"]
        name = safe_run_name(run_name_v)
        run_dir, n = ctx.workspaces.run_dir(sid, name), 2
        while os.path.exists(run_dir):
            run_dir = ctx.workspaces.run_dir(sid, f"{name}-{n}")
            n += 1
        try:  # the run trains on its own copy of the dataset (edits after Start change the next run only)
            frozen, recs = freeze_for_run(folder, run_dir)
        except SubmitError as e:
            return [f"**Error:** {e}"] + view_outputs(sid)
        values.update(pretrained_model_name_or_path=(base_v or "").strip(), token_abstraction=trig,
                      concept=concept_v, preset=concept_v, instance_data_dir=frozen, output_dir=run_dir,
                      resume_from_checkpoint=None,
                      class_data_dir=os.path.join(run_dir, "class_images") if values.get("with_prior_preservation")
                      else None)
        try:
            cfg = TrainConfig.from_sources(**values)
            check_total_steps(cfg, len(recs), ctx.policy)
            job = ctx.jobs.submit(sid, cfg)
        except (ConfigError, VisitorError, RuntimeError) as e:
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing of a refused run is kept
            msg = format_config_error(e) if isinstance(e, ConfigError) else f"**Error:** {e}"
            return [msg] + view_outputs(sid)
        renamed = "" if os.path.basename(run_dir) == name else f" (a run named '{name}' exists, so this one " \
                                                                 f"is '{os.path.basename(run_dir)}')"
        pos = ctx.jobs.position(job)
        wait = f" Waiting in line: position {pos}." if pos > 1 else ""
        return [f"Training **{job.run_name}** submitted{renamed}.{wait}"] + view_outputs(sid)

    def stop(ws_id, request: gr.Request):
        sid = ctx.sid(ws_id, request)
        job = ctx.jobs.latest(sid)
        if job is None or job.state not in J.ACTIVE:
            return ["Nothing is running."] + view_outputs(sid)
        ctx.jobs.stop(job)
        return ["Stopping after the current step; the last checkpoint is kept."] + view_outputs(sid)

    def resume(ws_id, request: gr.Request):
        sid = ctx.sid(ws_id, request)
        try:  # the run's saved config.json (its plan, no second preflight) on its frozen dataset
            return [run_submit.resume(ctx, sid)] + view_outputs(sid)
        except run_submit.SubmitError as e:
            return [f"**Error:** {without_paths(str(e))}"] + view_outputs(sid)  # no server folder

    def poll(ws_id, request: gr.Request):
        return view_outputs(ctx.sid(ws_id, request))

    def status_api(ws_id, request: gr.Request):
        return view_outputs(ctx.sid(ws_id, request))[5]

    start.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
         for n in ["run_name", "concept", "trigger", "base_model"] + ADV_NAMES + ["ws", "request"]])
    start.__annotations__ = {"request": gr.Request}
    start_btn.click(start, [run_name, concept, trigger, base_model] + adv_list + [ws],
                    [status] + view_comps + [fix_btn], api_name="start_training")

    def fix_captions(concept_v, trigger_v, instance_prompt_v, ws_id, request: gr.Request):
        """The one-click fix of a refused Start: the trigger goes into every caption that lacks it."""
        folder = ctx.workspaces.uploads_dir(ctx.sid(ws_id, request))
        trig = (trigger_v or "TOK").strip()
        fallback = replace_word(instance_prompt_v or "", "TOK", trig)
        n = add_trigger(folder, concept_v, trig, fallback)
        return (f"Added `{trig}` to {n} caption(s) (see the Dataset tab). Press Start training again.",
                gr.update(visible=False), cards_of(read_records(folder)))

    fix_btn.click(fix_captions, [concept, trigger, comps["instance_prompt"], ws],
                  [status, fix_btn, ctx.components["dataset_cards"]], api_name="add_trigger_to_captions")
    stop_btn.click(stop, [ws], [status] + view_comps, api_name="stop_training")
    resume_btn.click(resume, [ws], [status] + view_comps, api_name="resume_training")
    timer.tick(poll, [ws], view_comps, api_visibility="private", show_progress="hidden")
    status_btn = gr.Button(visible=False)
    status_btn.click(status_api, [ws], [status_json], api_name="training_status")

    def on_load(load_ev):
        load_ev.then(poll, [ws], view_comps, api_visibility="private")

    # what a reload puts back (ui/choices.py): the run name, every setting and the preset they came from
    choices = {"run_name": run_name, **{n: comps[n] for n in ADV_NAMES}, "last_applied": last_applied}
    return {"on_load": on_load, "timer": timer, "choices": choices}
