"""Per-browser-session workspaces.

A workspace id is a secret: ``secrets.token_urlsafe`` made by the server when a browser first loads the page
(:meth:`Workspaces.new_id`), kept in that browser's ``gr.BrowserState`` and bound to it: the workspace records a
digest of the browser's HttpOnly cookie (:class:`BrowserCookie` sets it; scripts cannot read it), and a request
whose cookie does not match is refused (:meth:`Workspaces.check_access`), so an id copied out of one browser, or
a replayed ``session_hash`` holding it, opens nothing elsewhere. An API client (``gradio_client``, no page load)
works in the workspace named by its own ``session_hash`` (a uuid4), which may never be a browser's workspace.

Each workspace owns ``<root>/sessions/<id>/`` with:

* ``uploads/``: the dataset being prepared (images + ``metadata.jsonl``); deleted by the cleaner when the
  session has been idle longer than ``max_idle_s``, with every served copy of its files (``on_clean`` hooks);
* ``runs/<run-name>/``: training runs (kept by the cleaner);
* ``choices.json``: the form's last values (concept, trigger, base model, run name, every setting), so a
  reload shows what the user had chosen.

Files under ``<root>/sessions`` are never served by their own path (``ui/file_guard.py``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import threading
import time
from typing import Callable, Optional

_ID_RE = re.compile(r"^[A-Za-z0-9_-]{4,64}$")
_RUN_RE = re.compile(r"[^A-Za-z0-9._-]+")
BROWSER_COOKIE = "ls_browser"  # HttpOnly, random per browser: what a workspace is bound to
_OWNER_FILE = ".owner"


class WorkspaceRefused(ValueError):
    """A request named a workspace its browser does not hold."""


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
        self.on_clean: list[Callable[[str], None]] = []  # called with each session id whose uploads were deleted

    # ----- ids and who holds them --------------------------------------------------------------------------
    @staticmethod
    def new_id() -> str:
        """A fresh workspace id: 32 URL-safe characters from the OS's CSPRNG."""
        return secrets.token_urlsafe(24)

    def _owner(self, sid: str) -> Optional[str]:
        try:
            with open(os.path.join(self.sessions_root, sid, _OWNER_FILE), encoding="ascii") as f:
                return f.read().strip() or None
        except (OSError, ValueError):
            return None

    def is_bound(self, sid: str) -> bool:
        """True when workspace ``sid`` is bound to a browser's cookie."""
        return self.exists(sid) and self._owner(sid) is not None

    def bind(self, sid: str, browser: Optional[str]) -> None:
        """Binds workspace ``sid`` to the browser whose cookie is ``browser`` (a digest is stored)."""
        self.session_dir(sid)
        if browser:
            with open(os.path.join(self.sessions_root, sid, _OWNER_FILE), "w", encoding="ascii") as f:
                f.write(_digest(browser))

    def held_by(self, sid: str, browser: Optional[str]) -> bool:
        """True when ``sid`` exists and belongs to ``browser`` (the cookie value)."""
        owner = self._owner(sid) if self.exists(sid) else None
        return bool(owner and browser and secrets.compare_digest(owner, _digest(browser)))

    def check_access(self, sid: str, browser: Optional[str], *, api: bool) -> None:
        """Refuses (:class:`WorkspaceRefused`) a request for ``sid`` from another browser: a workspace bound to a
        browser opens only with its cookie; an API client's own workspace (``api``) is never a browser's."""
        owner = self._owner(sid) if self.exists(sid) else None
        if owner is None:  # an API client's workspace, or a browser that sends no cookies (the id is the key)
            return
        if api or not browser or not secrets.compare_digest(owner, _digest(browser)):
            raise WorkspaceRefused("This workspace belongs to another browser: reload the page.")

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
        for sid in cleaned:  # e.g. the served copies of the session's files (ui/file_guard.py)
            for hook in self.on_clean:
                hook(sid)
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


def _digest(browser: str) -> str:
    return hashlib.sha256(("lora-studio-browser\0" + browser).encode("utf-8", "surrogateescape")).hexdigest()


def browser_of(request) -> Optional[str]:
    """The browser cookie of a ``gr.Request`` (None for API clients, which have none)."""
    try:
        cookies = getattr(request, "cookies", None) or {}
        value = cookies.get(BROWSER_COOKIE)
    except Exception:
        value = None
    return value if isinstance(value, str) and 16 <= len(value) <= 128 else None


class BrowserCookie:
    """ASGI middleware: gives every browser an HttpOnly random cookie on its first page load
    (what :meth:`Workspaces.bind` binds a workspace to); other requests pass untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "GET" or scope.get("path") not in ("/", ""):
            return await self.app(scope, receive, send)
        raw = dict(scope.get("headers") or []).get(b"cookie", b"").decode("latin-1")
        if f"{BROWSER_COOKIE}=" in raw:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        https = scope.get("scheme") == "https" or headers.get(b"x-forwarded-proto", b"").startswith(b"https")
        # Over https (a Space shows the app in an iframe of another site) the cookie must be allowed there.
        site = "SameSite=None; Secure; Partitioned" if https else "SameSite=Lax"
        cookie = f"{BROWSER_COOKIE}={secrets.token_urlsafe(32)}; Path=/; HttpOnly; {site}; Max-Age=31536000".encode()

        async def wrapped(message):
            if message.get("type") == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + [(b"set-cookie", cookie)]}
            await send(message)

        await self.app(scope, receive, wrapped)
