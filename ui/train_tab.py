"""Train tab: concept preset, the short form + expert sections (ui/train_form.py), the run's length, Start/Stop/Resume,
live progress, loss plot, samples."""
from __future__ import annotations

import inspect
import os
import shutil
from enum import Enum

import gradio as gr

from trainer import (ConfigError, TrainConfig, coerce_field, field_type, load_preset, preset_info,
                     replace_word)

from trainer.families.loading import without_paths

from . import jobs as J, run_submit
from .allowlist import VisitorError, check_request, check_total_steps, planned_steps
from .dataset_files import add_trigger, cards_of, lacking_trigger, read_records, rename_trigger, save_records
from .dataset_store import edit_lock
from . import train_form
from .run_submit import SubmitError, freeze_for_run
from .sessions import safe_run_name
from .train_form import ADV, ADV_NAMES, SHORT_FIELDS, in_form_words, label_of  # noqa: F401 (ADV: tests)
from .train_view import (GUESS_S_PER_STEP, _fmt_time, job_view, loss_frame, lr_md,  # noqa: F401 (tests)
                         progress_html, run_length_md, summarize)

CONCEPTS = ["face", "style", "object", "custom"]


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


def format_config_error(err: ConfigError) -> str:
    """One row per bad field, in the form's words (its label, then the field name in small print)."""
    rows = ["| setting | value | what is accepted |", "|---|---|---|"]
    for e in err.errors:
        val = repr(e.value).replace("|", "\\|").replace("`", "'")
        msg = in_form_words(e.message).replace("|", chr(92) + "|")
        rows.append(f"| **{label_of(e.name)}** <sub>`{e.name}`</sub> | `{val}` | {msg} |")
    return "**Error:** **The settings need a fix before training can start:**\n\n" + "\n".join(rows)


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
    comps, sections = train_form.build(init)
    adv_list = [comps[n] for n in ADV_NAMES]

    run_length = gr.Markdown("", elem_id="ls-run-length")
    with gr.Row():
        start_btn = gr.Button("Start training", variant="primary", elem_id="ls-start")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="ls-stop", interactive=False)
        resume_btn = gr.Button("Resume", elem_id="ls-resume", interactive=False)
    status = gr.Markdown("", elem_id="ls-train-status")
    fix_btn = gr.Button("Add the trigger to the captions", visible=False, variant="primary", elem_id="ls-fix-trigger")
    progress = gr.HTML(progress_html({"state": "none"}), elem_id="ls-progress-box")
    lr_box = gr.Markdown("", elem_id="ls-lr")
    with gr.Row():
        loss_plot = gr.LinePlot(loss_frame({"losses": [], "val_losses": []}), x="step", y="loss", color="series",
                                label="Loss", elem_id="ls-loss", height=260, scale=3)
        samples = gr.Gallery(label="Sample images (newest first)", columns=4, height=260, elem_id="ls-samples", scale=2)
    log = gr.Textbox(label="Log (newest line first)", lines=8, max_lines=8, autoscroll=False, elem_id="ls-log",
                     interactive=False)
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
            msg += "\n\nKept your own values for: " + ", ".join(f"**{label_of(k)}** = {out[k]}" for k in kept)
        # the short form's hints name the new preset's value
        shown = [gr.update(value=out[n], info=train_form.preset_hint(n, new_last[n])) if n in SHORT_FIELDS
                 else out[n] for n in ADV_NAMES]
        return shown + [new_last, msg]

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
        shown = ctx.served(sid, s["samples"][::-1])  # the session's own copies (ui/file_guard.py), newest first
        resumable = s["state"] in (J.STOPPED, J.FAILED) and bool(s["run"]) and os.path.isdir(
            os.path.join(ctx.workspaces.runs_dir(sid), s["run"], "checkpoints"))
        # the log newest line first: the latest is what people look for
        return [progress_html(s), lr_md(s), df, "\n".join(s["log"][::-1]), shown, brief,
                gr.Timer(active=active), gr.update(interactive=active), gr.update(interactive=resumable)]

    view_comps = [progress, lr_box, loss_plot, log, samples, status_json, timer, stop_btn, resume_btn]

    bad_fields: dict[str, list] = {}  # session -> the fields the last Start's error named (outlined by mark)

    def refuse(sid, msg: str, names: list) -> list:
        bad_fields[sid] = names
        return [f"**Error:** {in_form_words(msg)}"] + view_outputs(sid)

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
            return refuse(sid, str(e), train_form.fields_named(str(e)))
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
        except ConfigError as e:
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing of a refused run is kept
            bad_fields[sid] = [x.name for x in e.errors]
            return [format_config_error(e)] + view_outputs(sid)
        try:
            check_total_steps(cfg, len(recs), ctx.policy)
        except VisitorError as e:
            shutil.rmtree(run_dir, ignore_errors=True)
            return refuse(sid, str(e), train_form.fields_named(str(e)))
        try:
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

    def length_of(base_v, *args):
        *vals, ws_id, request = args
        sid = ctx.sid(ws_id, request)
        n = len(read_records(ctx.workspaces.uploads_dir(sid)))
        try:
            cfg = TrainConfig.from_dict({n_: from_ui(n_, v) for n_, v in zip(ADV_NAMES, vals)})
        except ConfigError as e:
            bad = ", ".join(f"**{label_of(x.name)}**" for x in e.errors)
            return f"**This run:** fix {bad} to see its length."
        measured = summarize(job_view(ctx, sid)).get("s_per_it")
        base = (base_v or "").strip()
        tiny = base.startswith("tiny")
        guess = GUESS_S_PER_STEP["tiny" if tiny else ("sdxl" if "xl" in base.lower() else "sd")]
        return run_length_md(planned_steps(cfg, n), n, measured or guess, bool(measured),
                             cpu_only=not ctx.cuda and not tiny)

    length_of.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
         for n in ["base_model"] + ADV_NAMES + ["ws", "request"]])
    length_of.__annotations__ = {"request": gr.Request}
    length_inputs = [base_model] + adv_list + [ws]
    gr.on([base_model.change, ctx.components["dataset_cards"].change, concept.change]
          + [comps[n].change for n in ("max_train_steps", "steps_per_image", "repeats", "train_batch_size",
                                        "gradient_accumulation_steps", "num_train_epochs")],
          length_of, length_inputs, [run_length], api_visibility="private", trigger_mode="always_last",
          show_progress="hidden")

    def mark(ws_id, request: gr.Request):
        return train_form.mark_fields(bad_fields.pop(ctx.sid(ws_id, request), []), sections)

    def poll(ws_id, request: gr.Request):
        return view_outputs(ctx.sid(ws_id, request))

    def status_api(ws_id, request: gr.Request):
        return view_outputs(ctx.sid(ws_id, request))[5]

    start.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
         for n in ["run_name", "concept", "trigger", "base_model"] + ADV_NAMES + ["ws", "request"]])
    start.__annotations__ = {"request": gr.Request}
    start_btn.click(start, [run_name, concept, trigger, base_model] + adv_list + [ws],
                    [status] + view_comps + [fix_btn], api_name="start_training").then(
        mark, [ws], adv_list + list(sections.values()), api_visibility="private", show_progress="hidden")

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
        load_ev.then(poll, [ws], view_comps, api_visibility="private").then(
            length_of, length_inputs, [run_length], api_visibility="private", show_progress="hidden")

    # what a reload puts back (ui/choices.py): the run name, every setting and the preset they came from
    choices = {"run_name": run_name, **{n: comps[n] for n in ADV_NAMES}, "last_applied": last_applied}
    return {"on_load": on_load, "timer": timer, "choices": choices}
