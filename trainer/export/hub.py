"""Uploading a run's artifacts to the Hugging Face Hub (never checkpoints, logs or the dataset), with errors
that say what to do. The token is passed through, never stored."""
from __future__ import annotations

from typing import Optional

from ..hub_errors import http_status, is_unreachable


HUB_PATTERNS = ["*.safetensors", "README.md", "samples/*.png", "config.json"]


FILES_KEPT_HINT = "The run folder is complete; push again when online."


def push_to_hub(run_dir: str, repo_id: str, token: Optional[str], private: bool = False,
                commit_message: str = "Upload LoRA", offline_hint: str = FILES_KEPT_HINT) -> str:
    """Uploads the artifacts (never checkpoints or logs). The token is passed through, never stored.
    ``offline_hint`` ends the message of an unreachable Hub (where the files are meanwhile)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=run_dir, repo_id=repo_id, allow_patterns=HUB_PATTERNS,
                          ignore_patterns=["checkpoints/*", "events.jsonl", "logs/*", "dataset/*"],
                          commit_message=commit_message)
    except Exception as exc:
        raise HubError(describe_hub_error(exc, token, offline_hint)) from None
    return str(url)


class HubError(RuntimeError):
    pass


def describe_hub_error(exc: Exception, token: Optional[str], offline_hint: str = FILES_KEPT_HINT) -> str:
    """A failed push as one sentence that says what to do (never the token itself)."""
    status = http_status(exc)
    if status == 401:
        msg = "the Hub rejected the token (401). Create a token with write access at huggingface.co/settings/tokens."
    elif status == 403:
        msg = "the token may not write to this repo (403): use a write token or a repo under your own name."
    elif is_unreachable(exc):
        msg = f"the Hub could not be reached (no network). {offline_hint}"
    else:
        msg = f"{type(exc).__name__}: {exc}"[:300]
    if token:
        msg = msg.replace(token, "***")
    return f"Push to the Hub failed: {msg}"
