"""Publish tab: push a run's artifacts and model card to the Hugging Face Hub. The token is never kept."""
from __future__ import annotations

import os
import re

import gradio as gr

from .generate_tab import finished_runs

# Where a visitor finds the files when the Hub is out of reach (ui/download_view.py).
FILES_KEPT_HINT = ("Your LoRA is ready meanwhile: Generate → *Download this run's files* has every file and a zip; "
                "push again when the Hub can be reached.")
_REPO_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def build(ctx) -> dict:
    ws = ctx.ws_state
    gr.Markdown("Upload the LoRA, the embeddings and the model card (never checkpoints or logs) to a model repo "
                "on the Hub. Create a **write** token at huggingface.co/settings/tokens; it is used for this "
                "upload only and is not stored.")
    with gr.Row():
        run = gr.Dropdown([], label="Run", elem_id="ls-pub-run", scale=3, allow_custom_value=True)
        refresh_btn = gr.Button("↻ Refresh", size="sm", scale=0, min_width=90)
    with gr.Row():
        token = gr.Textbox("", label="Hub token", type="password", elem_id="ls-token", placeholder="hf_...")
        repo = gr.Textbox("", label="Repo name", placeholder="your-name/my-lora", elem_id="ls-repo")
        private = gr.Checkbox(True, label="Private repo")
    push_btn = gr.Button("Push to the Hub", variant="primary", elem_id="ls-push")
    result = gr.Markdown("", elem_id="ls-push-result")

    def refresh(ws_id, request: gr.Request):
        runs = finished_runs(ctx, ctx.sid(ws_id, request))
        return gr.Dropdown(choices=runs, value=runs[0] if runs else None)

    def push(run, token, repo, private, ws_id, request: gr.Request):
        run_v, token_v, repo_v, private_v = run, token, repo, private
        from trainer import HubError, push_to_hub

        sid = ctx.sid(ws_id, request)
        if not run_v:
            return "**Error:** Pick a finished run first."
        repo_v = (repo_v or "").strip()
        if not _REPO_RE.match(repo_v):
            return "**Error:** The repo name must look like `name` or `your-name/name` (letters, digits, `-`, `_`, `.`)."
        if not (token_v or "").strip():
            return "**Error:** Paste a Hub token with write access."
        run_dir = os.path.join(ctx.workspaces.runs_dir(sid), os.path.basename(run_v))
        if not os.path.isdir(run_dir):
            return f"**Error:** No run named '{run_v}' in this session."
        try:
            url = push_to_hub(run_dir, repo_v, token_v.strip(), bool(private_v), offline_hint=FILES_KEPT_HINT)
        except HubError as e:
            msg = str(e).replace(token_v.strip(), "***")
            return f"**Error:** {msg}"
        return f"Pushed to [{url}]({url})"

    push_btn.click(push, [run, token, repo, private, ws], [result], api_name="push_to_hub", concurrency_limit=1)
    refresh_btn.click(refresh, [ws], [run], api_visibility="private")

    def on_load(load_ev):
        load_ev.then(refresh, [ws], [run], api_visibility="private")

    return {"on_load": on_load, "refresh": (refresh, [ws], [run])}
