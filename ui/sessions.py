"""Per-browser-session workspaces.

Each session (a ``gr.Request.session_hash``, or the workspace id a browser kept in its ``gr.BrowserState`` so a
reload finds the same folder) owns ``<root>/sessions/<id>/`` with:

* ``uploads/``: the dataset being prepared (images + ``metadata.jsonl``); deleted by the cleaner when the
  session has been idle longer than ``max_idle_s``;
* ``runs/<run-name>/``: training runs (kept by the cleaner);
* ``choices.json``: the form's last values (concept, trigger, base model, run name, every setting), so a
  reload shows what the user had chosen.

Files under ``<root>/sessions`` are never served by their own path: :class:`SessionFileGuard` refuses every
``/gradio_api/file=`` request into that folder, so a session only sees the copies Gradio puts in its cache for
the outputs handed to *that* session (their URLs carry a content hash that other sessions do not know).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from typing import Optional
from urllib.parse import unquote

_ID_RE = re.compile(r"^[A-Za-z0-9_-]{4,64}$")
_RUN_RE = re.compile(r"[^A-Za-z0-9._-]+")


def valid_session_id(sid: Optional[str]) -> bool:
    return bool(sid) and bool(_ID_RE.match(str(sid)))


def safe_run_name(name: Optional[str]) -> str:
    """A run name usable as one folder name: letters, digits, '.', '_' and '-'."""
    cleaned = _RUN_RE.sub("-", (name or "").strip()).strip(".-")
    return cleaned[:64] or "my-lora"


class SessionLimitError(ValueError):
    """A new workspace refused: the operator's --max-sessions are all in use."""


class Workspaces:
    def __init__(self, root: str, max_idle_s: float = 6 * 3600, max_sessions: Optional[int] = None):
        self.root = os.path.realpath(root)
        self.sessions_root = os.path.join(self.root, "sessions")
        self.max_idle_s = max_idle_s
        self.max_sessions = max_sessions  # workspaces seen within max_idle_s; None: no limit
        os.makedirs(self.sessions_root, exist_ok=True)
        self._lock = threading.Lock()

    # ----- paths ------------------------------------------------------------------------------------------
    def session_dir(self, sid: str) -> str:
        if not valid_session_id(sid):
            raise ValueError("invalid session id")
        d = os.path.join(self.sessions_root, sid)
        if self.max_sessions is not None and not os.path.isdir(d):
            with self._lock:
                if not os.path.isdir(d) and self.active_count() >= self.max_sessions:
                    raise SessionLimitError(f"This app is serving its limit of {self.max_sessions} workspaces. "
                                            "Try again later, when an idle one has been cleaned up.")
                os.makedirs(d)
        os.makedirs(os.path.join(d, "uploads"), exist_ok=True)
        os.makedirs(os.path.join(d, "runs"), exist_ok=True)
        self.touch(sid)
        return d

    def uploads_dir(self, sid: str) -> str:
        return os.path.join(self.session_dir(sid), "uploads")

    def runs_dir(self, sid: str) -> str:
        return os.path.join(self.session_dir(sid), "runs")

    def run_dir(self, sid: str, name: str) -> str:
        return os.path.join(self.runs_dir(sid), safe_run_name(name))

    def exists(self, sid: str) -> bool:
        return valid_session_id(sid) and os.path.isdir(os.path.join(self.sessions_root, sid))

    def owns(self, sid: str, path: str) -> bool:
        """True when ``path`` lies inside the session's folder."""
        if not valid_session_id(sid) or not path:
            return False
        base = os.path.realpath(os.path.join(self.sessions_root, sid))
        p = os.path.realpath(path)
        return p == base or p.startswith(base + os.sep)

    def list_runs(self, sid: str) -> list[str]:
        d = self.runs_dir(sid)
        runs = [n for n in os.listdir(d) if os.path.isdir(os.path.join(d, n))]
        return sorted(runs, key=lambda n: os.path.getmtime(os.path.join(d, n)), reverse=True)

    # ----- the form's choices -----------------------------------------------------------------------------
    def save_choices(self, sid: str, values: dict) -> None:
        """Writes ``values`` (JSON-able) atomically; a failure (disk full...) is not the user's problem here."""
        path = os.path.join(self.session_dir(sid), "choices.json")
        tmp = f"{path}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(values, f)
            os.replace(tmp, path)
        except (OSError, TypeError, ValueError):
            try:
                os.remove(tmp)
            except OSError:
                pass

    def load_choices(self, sid: str) -> dict:
        """The saved values, or {} when there are none or the file is unreadable."""
        if not self.exists(sid):
            return {}
        try:
            with open(os.path.join(self.sessions_root, sid, "choices.json"), encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    # ----- activity and cleaning --------------------------------------------------------------------------
    def touch(self, sid: str) -> None:
        marker = os.path.join(self.sessions_root, sid, ".last_seen")
        try:
            with open(marker, "a"):
                pass
            os.utime(marker, None)
        except OSError:
            pass

    def last_seen(self, sid: str) -> float:
        d = os.path.join(self.sessions_root, sid)
        for p in (os.path.join(d, ".last_seen"), d):
            try:
                return os.path.getmtime(p)
            except OSError:
                continue
        return 0.0

    def active_count(self, now: Optional[float] = None) -> int:
        """Workspaces seen within ``max_idle_s`` (what --max-sessions counts)."""
        now = time.time() if now is None else now
        try:
            names = os.listdir(self.sessions_root)
        except OSError:
            return 0
        return sum(1 for sid in names if valid_session_id(sid) and now - self.last_seen(sid) <= self.max_idle_s)

    def clean(self, now: Optional[float] = None, busy: frozenset = frozenset()) -> list[str]:
        """Deletes ``uploads/`` of sessions idle longer than ``max_idle_s`` (runs are kept); returns their ids."""
        now = time.time() if now is None else now
        cleaned = []
        with self._lock:
            try:
                names = os.listdir(self.sessions_root)
            except OSError:
                return cleaned
            for sid in names:
                if not valid_session_id(sid) or sid in busy:
                    continue
                up = os.path.join(self.sessions_root, sid, "uploads")
                if os.path.isdir(up) and now - self.last_seen(sid) > self.max_idle_s:
                    shutil.rmtree(up, ignore_errors=True)
                    cleaned.append(sid)
        return cleaned

    def start_cleaner(self, every_s: float = 600, busy_fn=None) -> threading.Thread:
        def loop():
            while True:
                time.sleep(every_s)
                try:
                    self.clean(busy=frozenset(busy_fn() if busy_fn else ()))
                except Exception:  # never let the cleaner die
                    pass

        t = threading.Thread(target=loop, name="workspace-cleaner", daemon=True)
        t.start()
        return t


class SessionFileGuard:
    """ASGI middleware: refuses ``/gradio_api/file=<path>`` (and ``/file=``) for any path inside ``protected``."""

    def __init__(self, app, protected: str):
        self.app = app
        self.protected = os.path.realpath(protected)

    def _blocked(self, raw_path: str) -> bool:
        path = unquote(raw_path)
        i = path.find("file=")
        if i < 0:
            return False
        target = path[i + len("file="):]
        if not target:
            return False
        try:
            p = os.path.realpath(target)
        except (OSError, ValueError):
            return True
        return p == self.protected or p.startswith(self.protected + os.sep)

    async def __call__(self, scope, receive, send):
        if scope.get("type") == "http" and "file=" in scope.get("path", "") and self._blocked(scope["path"]):
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
            await send({"type": "http.response.body", "body": b"File not allowed."})
            return
        await self.app(scope, receive, send)
