"""Dataset tab: upload images or a zip, see thumbnails, edit one caption per image, auto-caption, check."""
from __future__ import annotations

import json
import os
import shutil

import gradio as gr
import pandas as pd

from trainer import (ImageProblem, Record, bucket_histogram, check_dataset, collect_folder,
                     default_resolution_of_model, is_image_name, load_image, preset_info,
                     read_metadata_jsonl, write_metadata_jsonl)
from uploads import safe_extract_zip, safe_filename

from .allowlist import VisitorError, check_base_model, check_caption_model
from .dataset_store import edit_lock, merge_captions

DEFAULT_CAPTION_MODEL = "Salesforce/blip-image-captioning-large"
PROBLEMS_FILE = ".upload_problems.json"
TABLE_HEADERS = ["file", "caption"]
PROBLEM_HEADERS = ["file", "severity", "message", "fix"]


# ----- dataset on disk ----------------------------------------------------------------------------------------
def list_images(folder: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        for f in sorted(filenames):
            if not f.startswith(".") and is_image_name(f):
                out.append(os.path.join(dirpath, f))
    return out


def read_records(folder: str) -> list[Record]:
    """Every image of the folder with its caption (metadata.jsonl first, then a .txt sidecar)."""
    caps: dict[str, str] = {}
    if os.path.isfile(os.path.join(folder, "metadata.jsonl")):
        recs, _ = read_metadata_jsonl(folder)
        caps = {os.path.realpath(r.path): r.caption for r in recs if r.caption is not None}
    records = []
    for p in list_images(folder):
        cap = caps.get(os.path.realpath(p))
        if cap is None:
            txt = os.path.splitext(p)[0] + ".txt"
            if os.path.isfile(txt):
                try:
                    with open(txt, encoding="utf-8", errors="replace") as f:
                        cap = f.read(64 * 1024).strip()
                except OSError:
                    cap = None
        records.append(Record(p, cap or "", os.path.relpath(p, folder).replace(os.sep, "/")))
    return records


def save_records(folder: str, records: list[Record]) -> None:
    write_metadata_jsonl(folder, records)


def load_problems(folder: str) -> list[dict]:
    try:
        with open(os.path.join(folder, PROBLEMS_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return []


def save_problems(folder: str, problems: list[dict]) -> None:
    with open(os.path.join(folder, PROBLEMS_FILE), "w", encoding="utf-8") as f:
        json.dump(problems[-200:], f)


def table_of(records: list[Record]) -> pd.DataFrame:
    return pd.DataFrame([[r.source_name, r.caption or ""] for r in records], columns=TABLE_HEADERS)


def gallery_of(records: list[Record]) -> list[tuple[str, str]]:
    return [(r.path, r.source_name) for r in records]


def problems_table(problems: list[dict]) -> pd.DataFrame:
    rows = [[p.get("file", ""), p.get("severity", "error"), p.get("message", ""), p.get("fix", "")] for p in problems]
    return pd.DataFrame(rows, columns=PROBLEM_HEADERS)


# Problems of a zip that leave the image in the dataset (shown as warnings, not as skipped files).
_KEPT_CODES = frozenset({"caption_not_utf8", "caption_too_large", "unreadable_caption", "missing_caption_column",
                         "bad_caption"})


def ingest_files(paths: list[str], dest: str) -> tuple[list[str], list[dict], list[dict]]:
    """Copies good images (and the images of zips) into ``dest``; bad files give one problem each and are dropped.

    Returns ``(added paths, problems, notes)``: problems are dicts (file, code, severity, message, fix) with
    severity "error" (file skipped) or "warning" (file kept); notes tell what was done to accepted files
    (16-bit scaled, first frame of an animation, EXIF rotation, renamed...).
    """
    added, problems, notes = [], [], []
    taken = {n.lower() for n in os.listdir(dest)}
    for src in paths or []:
        src = src if isinstance(src, str) else getattr(src, "name", str(src))
        shown = os.path.basename(src)
        if shown.lower().endswith(".zip"):
            a, p, n = _ingest_zip(src, shown, dest)
            added += a
            problems += p
            notes += n
            taken = {n.lower() for n in os.listdir(dest)}
            continue
        try:
            loaded = load_image(src)
        except ImageProblem as e:
            problems.append({"file": shown, "code": e.code, "severity": "error", "message": e.message, "fix": e.fix})
            continue
        name = safe_filename(shown, taken=taken)
        taken.add(name.lower())
        target = os.path.join(dest, name)
        shutil.copyfile(src, target)
        added.append(target)
        file_notes = list(loaded.notes)
        if name != shown:
            file_notes.append(f"saved as '{name}'")
        if file_notes:
            notes.append({"file": shown, "message": "; ".join(file_notes)})
    return added, problems, notes


def _ingest_zip(src: str, shown: str, dest: str) -> tuple[list[str], list[dict], list[dict]]:
    """Extracts a zip into a hidden staging folder, reads its metadata.jsonl / .txt captions, checks every image
    and moves the good ones (with a .txt caption) into ``dest``. Problems name '<zip>: <entry>'."""
    import tempfile

    added, problems, notes = [], [], []

    def prob(file, code, message, fix, severity="error"):
        problems.append({"file": f"{shown}: {file}" if file != shown else shown, "code": code,
                         "severity": severity, "message": message, "fix": fix})

    staging = tempfile.mkdtemp(prefix=".zip-", dir=dest)
    try:
        res = safe_extract_zip(src, staging)
        for p in res.problems:
            prob(p.file, p.code, p.message, p.fix)
        records, folder_probs = collect_folder(staging)
        for p in folder_probs:
            prob(p.file, p.code, p.message, p.fix, "warning" if p.code in _KEPT_CODES else "error")
        captions: dict[str, str] = {}
        for dirpath, _dirs, files in os.walk(staging):
            if "metadata.jsonl" in files:
                recs, meta_probs = read_metadata_jsonl(dirpath)
                rel_dir = os.path.relpath(dirpath, staging)
                for p in meta_probs:
                    where = p.file if rel_dir == "." else f"{rel_dir}/{p.file}"
                    prob(where, p.code, p.message, p.fix, "warning" if p.code in _KEPT_CODES else "error")
                captions.update({os.path.realpath(r.path): r.caption for r in recs if r.caption is not None})
        for rec in records:
            rel = rec.source_name
            try:
                loaded = load_image(rec.path)
            except ImageProblem as e:
                prob(rel, e.code, e.message, e.fix)
                continue
            rel_dir = os.path.dirname(rel)
            target_dir = os.path.join(dest, rel_dir) if rel_dir else dest
            os.makedirs(target_dir, exist_ok=True)
            name = safe_filename(os.path.basename(rel), taken={n.lower() for n in os.listdir(target_dir)})
            target = os.path.join(target_dir, name)
            os.replace(rec.path, target)
            added.append(target)
            caption = captions.get(os.path.realpath(rec.path), rec.caption)
            if caption is not None:
                with open(os.path.splitext(target)[0] + ".txt", "w", encoding="utf-8") as f:
                    f.write(caption)
            if loaded.notes:
                notes.append({"file": f"{shown}: {rel}", "message": "; ".join(loaded.notes)})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return added, problems, notes


def _unlink(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def caption_template(concept: str) -> tuple[str, str]:
    """(concept understood by the captioner, template with {caption}/{trigger}) for a preset."""
    try:
        tmpl = preset_info(concept).get("caption_template")
    except OSError:
        tmpl = None
    if tmpl:
        tmpl = tmpl.replace("TOK", "{trigger}")
    cap_concept = concept if concept in ("face", "object", "style", "character") else "object"
    return cap_concept, tmpl


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
    with gr.Row():
        with gr.Column(scale=2):
            # Locked until the page's workspace is loaded (on_load below): an upload made before that could
            # be wiped from the gallery by the load's own, older, listing of the folder.
            upload = gr.File(label="Images or a .zip", file_count="multiple", type="filepath",
                             elem_id="ls-upload", height=140, interactive=False)
            upload_msg = gr.Markdown("Loading your workspace…", elem_id="ls-upload-msg")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Your images", columns=6, height=260, object_fit="cover",
                                 elem_id="ls-gallery", allow_preview=True)
    with gr.Row():
        cap_model = gr.Textbox(ctx.policy.caption_models[0], label="Captioning model",
                               info="One of this app's captioning models: " + ", ".join(ctx.policy.caption_models) + ".",
                               elem_id="ls-caption-model", scale=3)
        overwrite = gr.Checkbox(True, label="Replace existing captions", scale=1)
        caption_btn = gr.Button("Auto-caption", variant="primary", elem_id="ls-autocaption", scale=1)
    table = gr.Dataframe(value=pd.DataFrame(columns=TABLE_HEADERS), headers=TABLE_HEADERS, column_count=2,
                         static_columns=[0], interactive=True, wrap=True, label="Captions (click a caption to edit)",
                         elem_id="ls-captions", column_widths=["28%", "72%"], max_height=360)
    with gr.Row():
        save_btn = gr.Button("Save captions", size="sm")
        check_btn = gr.Button("Check dataset", variant="secondary", elem_id="ls-check")
        clear_btn = gr.Button("Remove all images", size="sm", variant="stop", interactive=False)
    check_msg = gr.Markdown("", elem_id="ls-check-msg")
    with gr.Row():
        problems = gr.Dataframe(value=pd.DataFrame(columns=PROBLEM_HEADERS), headers=PROBLEM_HEADERS,
                                interactive=False, wrap=True, label="Problems", elem_id="ls-problems", scale=3)
        with gr.Column(scale=2):
            gr.Markdown("**Aspect buckets** (images are trained at these sizes, not cropped square)")
            hist = gr.HTML("", elem_id="ls-buckets")

    def refresh(ws_id, request: gr.Request):
        folder = ctx.workspaces.uploads_dir(ctx.sid(ws_id, request))
        recs = read_records(folder)
        return gallery_of(recs), table_of(recs)

    def on_upload(files, ws_id, request: gr.Request):
        folder = ctx.workspaces.uploads_dir(ctx.sid(ws_id, request))
        with edit_lock(folder):  # one dataset edit at a time (ui/dataset_store.py)
            before = {r.path: r.caption for r in read_records(folder)}
            added, probs, notes = ingest_files(files or [], folder)
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
        return None, gallery_of(recs), table_of(recs), "\n".join(lines), problems_table(probs)

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
            except CaptionerLoadError as e:
                raise gr.Error(f"{e} (Offline? Use the tiny demo captioner: tiny-blip.)")
        with edit_lock(folder):  # merged into the captions as they are now: edits made meanwhile are kept
            recs = read_records(folder)
            written, kept = merge_captions(recs, {r.path: r.caption for r in todo},
                                           {r.path: c for r, c in zip(todo, caps)})
            save_records(folder, recs)
        note = f" Kept {kept} caption(s) you edited meanwhile." if kept else ""
        return table_of(recs), f"Captioned {written} image(s) with `{model}`{where}.{note}"

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
        return f"Saved {len(recs)} caption(s) to metadata.jsonl."

    def on_check(base_model, trigger, ws_id, request: gr.Request):
        trigger_v = trigger
        try:
            base_model = check_base_model(base_model, ctx.policy)
        except VisitorError as e:
            raise gr.Error(str(e))
        folder = ctx.workspaces.uploads_dir(ctx.sid(ws_id, request))
        recs = read_records(folder)
        res = resolution_for(base_model)
        found = [dict(p.to_dict()) for p in check_dataset(recs, resolution=res, trigger=(trigger_v or "TOK"))]
        found = load_problems(folder) + found
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

    def on_clear(ws_id, request: gr.Request):
        folder = ctx.workspaces.uploads_dir(ctx.sid(ws_id, request))
        with edit_lock(folder):  # a run keeps its own copy (ui/dataset_store.py): clearing never touches it
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder, exist_ok=True)
        return [], table_of([]), "Dataset cleared.", problems_table([])

    upload.upload(on_upload, [upload, ws], [upload, gallery, table, upload_msg, problems], api_name="upload_images")
    caption_btn.click(on_caption, [cap_model, concept, trigger, overwrite, ws], [table, check_msg],
                      api_name="auto_caption", concurrency_id="gpu", concurrency_limit=1)
    table.input(on_save, [table, ws], [check_msg], api_visibility="private")
    save_btn.click(on_save, [table, ws], [check_msg], api_name="save_captions")
    check_btn.click(on_check, [ctx.components["base_model"], trigger, ws], [problems, hist, check_msg],
                    api_name="check_dataset")
    clear_btn.click(on_clear, [ws], [gallery, table, upload_msg, problems], api_name="clear_dataset")
    list_ev = gr.Button(visible=False)
    list_ev.click(refresh, [ws], [gallery, table], api_name="list_dataset")

    def ready(ws_id, request: gr.Request):
        shown, rows = refresh(ws_id, request)
        return shown, rows, gr.update(interactive=True), gr.update(interactive=True), ""

    def on_load(load_ev):
        load_ev.then(ready, [ws], [gallery, table, upload, clear_btn, upload_msg], api_visibility="private")

    return {"on_load": on_load, "gallery": gallery, "table": table}
