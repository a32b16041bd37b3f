"""Dataset tab: upload images or a zip, one card per image (thumbnail, caption, Remove), auto-caption, check."""
from __future__ import annotations

import os
import shutil

import gradio as gr

from trainer import ImageProblem, bucket_histogram, check_dataset, default_resolution_of_model, load_image

from uploads.accept import too_many_files_problem

from . import caption_cards
from .allowlist import VisitorError, check_base_model, check_caption_model
# the dataset on disk lives in dataset_files.py; these names stay importable from here
from .dataset_files import (PROBLEM_HEADERS, TABLE_HEADERS, caption_template, cards_of, gallery_of,  # noqa: F401
                            ingest_files, list_images, problems_table, read_records,
                            record_trigger, rename_trigger, save_problems, save_records, table_of)
from .dataset_store import edit_lock, merge_captions

DEFAULT_CAPTION_MODEL = "Salesforce/blip-image-captioning-large"
TINY_CAPTIONER = "tiny-blip"  # the offline demo captioner (captioning/tiny.py)


def default_captioner(policy, cuda: bool) -> tuple[str, str]:
    """(the captioning model to preselect, a note saying why): without a GPU or without the Hub, the offline
    demo captioner when the operator offers it; else the list's first."""
    from captioning.base import offline_requested

    first = policy.caption_models[0]
    if TINY_CAPTIONER in policy.caption_models and first != TINY_CAPTIONER and (offline_requested() or not cuda):
        why = "the Hugging Face Hub is not reachable from here" if offline_requested() else "this machine has no GPU"
        return TINY_CAPTIONER, (f"Set to the offline demo captioner `{TINY_CAPTIONER}` because {why}: it writes "
                                "placeholder words, so edit the captions (or pick another model when it can run).")
    return first, ""


def captioner_failed(model: str, err: Exception, load_error) -> str:
    """What a failed auto-caption says: one plain sentence, no traceback."""
    if isinstance(err, load_error) and getattr(err, "hub_unreachable", False):
        why = "needs the Hugging Face Hub, which this app cannot reach"
    elif isinstance(err, load_error):
        why = "could not be loaded here"
    else:
        why = "stopped with an error"
    return (f"**Auto-caption did not run:** the captioning model `{model}` {why}. Your captions are unchanged. "
            f"Pick `{TINY_CAPTIONER}` (the offline demo captioner) or type the captions yourself.")


def resolution_for(base_model: str) -> int:
    """The model's default resolution (the trainer's one rule); SDXL's 1024 when its configs cannot be read."""
    return default_resolution_of_model((base_model or "").strip()) or 1024


def histogram_html(hist: dict) -> str:
    if not hist:
        return "<p>No readable images.</p>"
    top = max(hist.values())
    rows = "".join(
        f"<div style='display:flex;align-items:center;gap:8px;margin:2px 0'>"
        f"<code style='width:90px'>{k}</code><div style='height:14px;width:{max(4, int(220 * v / top))}px;"
        f"background:var(--color-accent);border-radius:3px'></div><span>{v}</span></div>"
        for k, v in hist.items())
    return f"<div class='ls-hist'>{rows}</div>"


# ----- the tab --------------------------------------------------------------------------------------------------
def build(ctx) -> dict:
    ws = ctx.ws_state
    concept = ctx.components["concept"]
    trigger = ctx.components["trigger"]

    gr.Markdown("Add **3-150 photos** of your subject (drag and drop many files, or one .zip). Bad files are "
                "listed one by one; the good ones are kept.")
    # Locked until the page's workspace is loaded (on_load below): an upload made before that could be wiped
    # from the cards by the load's own, older, listing of the folder.
    upload = gr.File(label="Images or a .zip", file_count="multiple", type="filepath",
                     elem_id="ls-upload", height=120, interactive=False)
    upload_msg = gr.Markdown("Loading your workspace…", elem_id="ls-upload-msg")
    # What the API returns (/upload_images, /list_dataset...): a gallery and a [file, caption] table. The page
    # shows the cards instead.
    gallery = gr.Gallery(label="Your images", elem_id="ls-gallery", visible=False)
    table = gr.Dataframe(headers=TABLE_HEADERS, column_count=2, interactive=True, label="Captions",
                         elem_id="ls-captions", visible=False)
    cards = gr.State([])
    ctx.components["dataset_cards"] = cards  # the Train tab's one-click trigger fix redraws them
    with gr.Row():
        cap_default, cap_note = default_captioner(ctx.policy, ctx.cuda)
        cap_model = gr.Dropdown(list(ctx.policy.caption_models), value=cap_default, label="Captioning model",
                                info=cap_note or "One of this app's captioning models.",
                                elem_id="ls-caption-model", scale=3, min_width=240)
    with gr.Row():  # its own row: at 390 px the label is not squeezed beside the model
        overwrite = gr.Checkbox(True, label="Replace existing captions", scale=1, elem_id="ls-overwrite",
                                min_width=240)
        caption_btn = gr.Button("Auto-caption", variant="primary", elem_id="ls-autocaption", scale=1)
    check_msg = gr.Markdown("", elem_id="ls-check-msg")
    caption_cards.build(ctx, cards, gallery, table, check_msg)
    with gr.Row():
        save_btn = gr.Button(visible=False)  # /save_captions: the API's way to write the whole table
        check_btn = gr.Button("Check dataset", variant="secondary", elem_id="ls-check")
        clear_btn = gr.Button("Remove all images", size="sm", variant="stop", interactive=False,
                              elem_id="ls-clear")
    with gr.Row():
        problems = gr.Dataframe(value=problems_table([]), headers=PROBLEM_HEADERS,
                                interactive=False, wrap=True, label="Problems", elem_id="ls-problems", scale=3)
        with gr.Column(scale=2):
            gr.Markdown("**Aspect buckets** (images are trained at these sizes, not cropped square)")
            hist = gr.HTML("", elem_id="ls-buckets")

    def listing(folder, sid):
        recs = read_records(folder)  # images are shown as this session's own copies (ui/file_guard.py)
        return recs, ctx.served(sid, gallery_of(recs)), table_of(recs), cards_of(recs)

    def refresh(ws_id, request: gr.Request):
        sid = ctx.sid(ws_id, request)
        _recs, shown, rows, _cards = listing(ctx.workspaces.uploads_dir(sid), sid)
        return shown, rows

    def on_upload(files, ws_id, request: gr.Request):
        sid = ctx.sid(ws_id, request)
        folder = ctx.workspaces.uploads_dir(sid)
        with edit_lock(folder):  # one dataset edit at a time (ui/dataset_store.py)
            before = {r.path: r.caption for r in read_records(folder)}
            paths = [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in files or []]
            if len(paths) > ctx.policy.max_upload_files:
                added, probs, notes = [], [too_many_files_problem(len(paths), ctx.policy.max_upload_files)], []
            else:
                limit = ctx.policy.max_dataset_images
                added, probs, notes = ingest_files(paths, folder, room=limit - len(before), limit=limit)
            ctx.files.discard_uploads(paths)  # Gradio's own copies of the upload go once taken in (or refused)
            recs = read_records(folder)
            for r in recs:  # keep the captions the user already had
                if r.path in before and before[r.path]:
                    r.caption = before[r.path]
            save_records(folder, recs)
            save_problems(folder, probs)
        lines = [f"Added **{len(added)}** image(s); the dataset has **{len(recs)}**."]
        skipped = [p for p in probs if p.get("severity") == "error"]
        warned = [p for p in probs if p.get("severity") != "error"]
        if skipped:
            lines.append(f"**{len(skipped)} file(s) skipped:**")
            lines += [f"- `{p['file']}`: {p['message']} *Fix:* {p['fix']}" for p in skipped]
        if warned:
            lines.append(f"**{len(warned)} warning(s), file(s) kept:**")
            lines += [f"- `{p['file']}`: {p['message']} *Fix:* {p['fix']}" for p in warned]
        if notes:
            lines.append("**Notes:**")
            lines += [f"- `{n['file']}`: {n['message']}" for n in notes]
        return (None, ctx.served(sid, gallery_of(recs)), table_of(recs), "\n".join(lines), problems_table(probs),
                cards_of(recs))

    def on_caption(model, concept, trigger, overwrite, ws_id, request: gr.Request, progress=gr.Progress()):
        concept_v, trigger_v, overwrite_v = concept, trigger, overwrite
        from captioning import caption as run_caption
        from captioning.base import CaptionerLoadError

        try:
            model = check_caption_model(model or DEFAULT_CAPTION_MODEL, ctx.policy)
        except VisitorError as e:
            raise gr.Error(str(e))
        folder = ctx.workspaces.uploads_dir(ctx.sid(ws_id, request))
        with edit_lock(folder):
            recs = read_records(folder)
        todo = [r for r in recs if overwrite_v or not (r.caption or "").strip()]
        if not recs:
            raise gr.Error("Upload some images first.")
        cap_concept, tmpl = caption_template(concept_v)
        progress(0, desc="Loading the captioning model...")
        with ctx.jobs.gpu.captioning() as device:  # never the GPU a training holds (ui/gpu.py)
            where = " on the CPU (a training holds the GPU)" if device == "cpu" and ctx.jobs.gpu.has_cuda() else ""
            if ctx.jobs.busy():
                gr.Warning("A training is running: captioning shares the machine and will be slower.")
            try:
                caps = run_caption([r.path for r in todo], model=model, device=device,
                                   concept=cap_concept, trigger=(trigger_v or "TOK").strip(), template=tmpl,
                                   on_progress=lambda d, t: progress((d, t), desc="Captioning", unit="images"))
            except Exception as e:  # noqa: BLE001 - a plain sentence, the captions stay as they were
                return gr.skip(), captioner_failed(model, e, CaptionerLoadError), gr.skip()
        with edit_lock(folder):  # merged into the captions as they are now: edits made meanwhile are kept
            recs = read_records(folder)
            written, kept = merge_captions(recs, {r.path: r.caption for r in todo},
                                           {r.path: c for r, c in zip(todo, caps)})
            save_records(folder, recs)
            record_trigger(folder, (trigger_v or "TOK").strip())  # what a later trigger change rewrites
        note = f" Kept {kept} caption(s) you edited meanwhile." if kept else ""
        return table_of(recs), f"Captioned {written} image(s) with `{model}`{where}.{note}", cards_of(recs)

    def on_save(captions, ws_id, request: gr.Request):
        folder = ctx.workspaces.uploads_dir(ctx.sid(ws_id, request))
        df = captions
        by_name = {}
        if df is not None and len(df):
            for row in df.itertuples(index=False):
                by_name[str(row[0])] = "" if row[1] is None or (isinstance(row[1], float) and row[1] != row[1]) \
                    else str(row[1]).strip()
        with edit_lock(folder):
            recs = read_records(folder)
            for r in recs:
                if r.source_name in by_name:
                    r.caption = by_name[r.source_name]
            save_records(folder, recs)
        return f"Saved {len(recs)} caption(s) to metadata.jsonl.", cards_of(recs)

    def on_check(base_model, trigger, ws_id, request: gr.Request):
        trigger_v = trigger
        try:
            base_model = check_base_model(base_model, ctx.policy)
        except VisitorError as e:
            raise gr.Error(str(e))
        folder = ctx.workspaces.uploads_dir(ctx.sid(ws_id, request))
        recs = read_records(folder)
        res = resolution_for(base_model)
        # the trainer's checks (unreadable, sizes, duplicates, trigger, captions over the text encoder's limit) on
        # the files in the dataset; files skipped at upload are not in it, so they are not reported here
        found = [dict(p.to_dict()) for p in check_dataset(recs, resolution=res, trigger=(trigger_v or "TOK"))]
        sizes = []
        for r in recs:
            try:
                sizes.append(load_image(r.path).original_size)
            except ImageProblem:
                pass
        h = bucket_histogram(sizes, res)  # the same buckets the trainer will use (default bucket_step)
        errors = sum(1 for p in found if p.get("severity") == "error")
        warns = len(found) - errors
        if not found:
            msg = f"{len(recs)} images, no problems found."
        else:
            msg = f"{'**Errors found:**' if errors else '**Warnings:**'} {len(recs)} images: {errors} error(s), {warns} warning(s)."
        return problems_table(found), histogram_html(h), msg

    def on_trigger(trigger_v, ws_id, request: gr.Request):
        """A new trigger word rewrites the captions written with the old one (whole words), shown at once."""
        sid = ctx.sid(ws_id, request)
        folder = ctx.workspaces.uploads_dir(sid)
        new = (trigger_v or "").strip()
        with edit_lock(folder):
            changed, old = rename_trigger(folder, new)
        if not changed:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        recs = read_records(folder)
        msg = f"Trigger word changed from `{old}` to `{new}`: **{changed}** caption(s) rewritten (see below)."
        return cards_of(recs), ctx.served(sid, gallery_of(recs)), table_of(recs), msg

    def on_clear(ws_id, request: gr.Request):
        sid = ctx.sid(ws_id, request)
        folder = ctx.workspaces.uploads_dir(sid)
        with edit_lock(folder):  # a run keeps its own copy (ui/dataset_store.py): clearing never touches it
            ctx.files.purge(sid)  # every served copy of the removed photos: their URLs answer 404 now
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder, exist_ok=True)
        return [], table_of([]), "Dataset cleared.", problems_table([]), []

    upload.upload(on_upload, [upload, ws], [upload, gallery, table, upload_msg, problems, cards],
                  api_name="upload_images")
    caption_btn.click(on_caption, [cap_model, concept, trigger, overwrite, ws], [table, check_msg, cards],
                      api_name="auto_caption", concurrency_id="gpu", concurrency_limit=1)
    save_btn.click(on_save, [table, ws], [check_msg, cards], api_name="save_captions")
    check_btn.click(on_check, [ctx.components["base_model"], trigger, ws], [problems, hist, check_msg],
                    api_name="check_dataset")
    clear_btn.click(on_clear, [ws], [gallery, table, upload_msg, problems, cards], api_name="clear_dataset")
    gr.on([trigger.blur, trigger.submit], on_trigger, [trigger, ws], [cards, gallery, table, check_msg],
          api_name="rename_trigger")
    list_ev = gr.Button(visible=False)
    list_ev.click(refresh, [ws], [gallery, table], api_name="list_dataset")

    def ready(ws_id, request: gr.Request):
        sid = ctx.sid(ws_id, request)
        _recs, shown, rows, items = listing(ctx.workspaces.uploads_dir(sid), sid)
        return shown, rows, items, gr.update(interactive=True), gr.update(interactive=True), ""

    def on_load(load_ev):
        load_ev.then(ready, [ws], [gallery, table, cards, upload, clear_btn, upload_msg], api_visibility="private")

    return {"on_load": on_load, "gallery": gallery, "table": table, "cards": cards}
