"""The Download area of a finished run (under Generate): the kohya file, the diffusers file, the embeddings, the
model card, one zip of them all, and the sample images.

Everything is handed out as copies made for the asking session (``ui/file_guard.py``): attachment + nosniff,
URLs only that session knows. This is how a Space or Colab user without Hub access gets the LoRA out.
"""
from __future__ import annotations

import glob
import os

import gradio as gr

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
CARD_FILE = "README.md"


def run_files(run_dir: str) -> list[str]:
    """The run's artifacts in the order users look for them: kohya, diffusers, embeddings, model card."""
    if not run_dir or not os.path.isdir(run_dir):
        return []
    tensors = sorted(glob.glob(os.path.join(run_dir, "*.safetensors")))
    kohya = [p for p in tensors if os.path.basename(p) != DIFFUSERS_FILE and not p.endswith("_emb.safetensors")]
    diffusers = [p for p in tensors if os.path.basename(p) == DIFFUSERS_FILE]
    emb = [p for p in tensors if p.endswith("_emb.safetensors")]
    card = [os.path.join(run_dir, CARD_FILE)] if os.path.isfile(os.path.join(run_dir, CARD_FILE)) else []
    return kohya + diffusers + emb + card


def sample_files(run_dir: str) -> list[str]:
    """The run's sample images, newest first."""
    found = glob.glob(os.path.join(run_dir, "samples", "**", "*.png"), recursive=True) if run_dir else []
    return sorted(found, key=lambda p: os.path.getmtime(p), reverse=True)


def downloads_for(ctx, sid: str, run_dir) -> tuple[list[str], list[tuple[str, str]], str]:
    """(file copies incl. the zip, sample copies with captions, a line saying what is there) for one run."""
    if not run_dir:
        return [], [], "Pick a finished run above to download its files."
    files, samples = run_files(run_dir), sample_files(run_dir)
    if not files:
        return [], [], "This run has no exported files yet (it is still training, or it stopped before exporting)."
    name = os.path.basename(run_dir)
    members = [(p, os.path.basename(p)) for p in files]
    members += [(p, "samples/" + os.path.relpath(p, os.path.join(run_dir, "samples")).replace(os.sep, "/"))
                for p in samples]
    zipped = ctx.files.zip_for(sid, members, f"{name}-lora.zip")
    copies = [c for c in (ctx.files.copy_for(sid, p) for p in files) if c] + ([zipped] if zipped else [])
    shown = ctx.files.copies_for(sid, [(p, os.path.basename(p)) for p in samples])
    line = (f"**{name}**: the kohya / A1111 / ComfyUI file, the diffusers file, the embeddings and the model "
            f"card, or all of them (and {len(samples)} sample image(s)) in `{name}-lora.zip`.")
    return copies, shown, line


def build(ctx, run_dropdown, run_dir_of) -> dict:
    """The area; ``run_dropdown`` is the Generate tab's run choice, ``run_dir_of(run, ws_id, request)`` its folder."""
    with gr.Accordion("Download this run's files", open=False, elem_id="ls-download"):
        info = gr.Markdown("Pick a finished run above to download its files.", elem_id="ls-download-info")
        files = gr.File(label="Files (the zip holds them all)", file_count="multiple", interactive=False,
                        elem_id="ls-download-files")
        samples = gr.Gallery(label="Sample images", columns=6, height=200, elem_id="ls-download-samples")

    def show(run, ws_id, request: gr.Request):
        sid = ctx.sid(ws_id, request)
        copies, shown, line = downloads_for(ctx, sid, run_dir_of(run, ws_id, request))
        return copies or None, shown, line

    run_dropdown.change(show, [run_dropdown, ctx.ws_state], [files, samples, info], api_name="download_files")
    return {"files": files, "samples": samples, "info": info}
