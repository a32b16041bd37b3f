"""How the app serves files: only copies made for one session's responses, behind one guard on every file route.

Nothing under the sessions root is ever served by its own path. The sessions root is not in Gradio's
``allowed_paths``, so Gradio itself refuses it; on top of that :class:`FileGuard` (ASGI middleware) looks at
every Gradio file route (``/gradio_api/file=``, ``/file=``, ``/gradio_api/file/``, ``/file/``, with or without
the ``/gradio_api`` prefix, GET and HEAD) and answers 403 unless the file, with every symlink resolved, lies in
Gradio's cache folder and outside the sessions root. The path is the one the server decoded once
(``scope["path"]``); it is never decoded again, so ``%252e%252e`` stays the literal text it is.

A file a session should see (a thumbnail of its photo, a sample image, a run's LoRA file) is copied by
:meth:`SessionFiles.copy_for` into ``<gradio cache>/lora-studio/<app>/<session key>/<token>/<name>``, where the
session key and the token are HMACs under a secret made at start: unguessable, and different for every session,
so only the session the copy was handed to knows its URL. :meth:`SessionFiles.purge` deletes every copy of a
session (Remove images, the idle cleaner); the whole app folder is emptied at start.

Every answer of a file route carries ``Content-Disposition: attachment`` and ``X-Content-Type-Options: nosniff``
(an ``<img>`` still shows an image; a browser never renders a served file as a page). Upload routes are refused
with 413 when their declared size is over the operator's limit, before a byte is read.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import shutil
from typing import Optional

from uploads import safe_filename

# "/gradio_api/file=<path>", "/file=<path>", "/gradio_api/file/<path>", "/file/<path>"
_FILE_ROUTE = re.compile(r"^(?:/gradio_api)?/file(?:=|/)(.*)$", re.S)
_UPLOAD_ROUTE = re.compile(r"^(?:/gradio_api)?/upload/?$")


def gradio_cache_dir() -> str:
    """The folder Gradio keeps uploads and output copies in (``GRADIO_TEMP_DIR`` or ``<tmp>/gradio``)."""
    from gradio.utils import get_upload_folder

    return os.path.realpath(get_upload_folder())


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class SessionFiles:
    """Per-session served copies of files under the sessions root (see the module docstring)."""

    def __init__(self, sessions_root: str, cache_dir: Optional[str] = None):
        self.sessions_root = os.path.realpath(sessions_root)
        cache = os.path.realpath(cache_dir or gradio_cache_dir())
        app_key = hashlib.sha256(self.sessions_root.encode()).hexdigest()[:16]  # one folder per app root
        self.cache = cache
        self.root = os.path.join(cache, "lora-studio", app_key)
        self._secret = secrets.token_bytes(32)
        shutil.rmtree(self.root, ignore_errors=True)  # copies of an earlier process: their URLs are dead
        os.makedirs(self.root, exist_ok=True)

    def _key(self, *parts: str) -> str:
        return hmac.new(self._secret, "\0".join(parts).encode("utf-8", "surrogateescape"),
                        hashlib.sha256).hexdigest()[:32]

    def session_folder(self, sid: str) -> str:
        return os.path.join(self.root, self._key("session", sid))

    def copy_for(self, sid: str, path: str, name: Optional[str] = None) -> Optional[str]:
        """A copy of ``path`` that only session ``sid`` is handed (same file, same copy); None when it is gone.

        ``name`` is the file name the copy (and so its download) gets; the source's own name by default."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        real = os.path.realpath(path)
        token = self._key("file", sid, real, str(st.st_mtime_ns), str(st.st_size))
        folder = os.path.join(self.session_folder(sid), token)
        target = os.path.join(folder, safe_filename(name or os.path.basename(real)))
        if os.path.isfile(target):
            return target
        os.makedirs(folder, exist_ok=True)
        tmp = target + ".part"
        try:
            shutil.copyfile(real, tmp)
            os.replace(tmp, target)
        except OSError:
            _remove(tmp)
            return None
        return target

    def copies_for(self, sid: str, items):
        """``[(path, caption), ...]`` (a gallery's value) with each path replaced by the session's copy."""
        out = []
        for item in items or []:
            path, caption = (item if isinstance(item, (tuple, list)) else (item, None))
            if isinstance(path, str):
                copy = self.copy_for(sid, path)
                if copy is None:
                    continue
                path = copy
            out.append((path, caption) if isinstance(item, (tuple, list)) else path)
        return out

    def zip_for(self, sid: str, members, name: str) -> Optional[str]:
        """One zip (stored, not recompressed) of ``members`` (``[(path, name in the zip)]``) handed to ``sid``;
        the same files give the same zip. None when no member is readable or the disk is full."""
        import zipfile

        stats = []
        for path, arc in members:
            try:
                st = os.stat(path)
            except OSError:
                continue
            stats.append((os.path.realpath(path), arc, st))
        if not stats:
            return None
        token = self._key("zip", sid, name, *(f"{p}|{a}|{st.st_mtime_ns}|{st.st_size}" for p, a, st in stats))
        folder = os.path.join(self.session_folder(sid), token)
        target = os.path.join(folder, safe_filename(name))
        if os.path.isfile(target):
            return target
        os.makedirs(folder, exist_ok=True)
        tmp = target + ".part"
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
                for path, arc, _st in stats:
                    zf.write(path, arc)
            os.replace(tmp, target)
        except OSError:
            _remove(tmp)
            return None
        return target

    def discard_uploads(self, paths) -> None:
        """Deletes Gradio's cached copies of an upload (``paths`` inside its cache only) once it is taken in."""
        for p in paths or []:
            real = os.path.realpath(p)
            if _inside(real, self.cache) and not _inside(real, self.root) and os.path.isfile(real):
                _remove(real)
                try:
                    os.rmdir(os.path.dirname(real))  # Gradio's <hash>/ folder, when now empty
                except OSError:
                    pass

    def purge(self, sid: str) -> None:
        """Deletes every copy handed to ``sid``: their URLs answer 404 from now on."""
        shutil.rmtree(self.session_folder(sid), ignore_errors=True)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def file_route_target(path: str) -> Optional[str]:
    """The file a request path asks a Gradio file route for (``None`` when it is not a file route)."""
    m = _FILE_ROUTE.match(path)
    return m.group(1) if m else None


class FileGuard:
    """ASGI middleware in front of the Gradio app: every file route serves only files inside ``allowed`` (Gradio's
    cache) and outside ``protected`` (the sessions root), real paths compared; every answer of a file route is a
    download (attachment, nosniff); uploads over ``max_upload_bytes`` (declared length) are refused."""

    def __init__(self, app, protected: str, allowed: Optional[str] = None, max_upload_bytes: Optional[int] = None):
        self.app = app
        self.protected = os.path.realpath(protected)
        self.allowed = os.path.realpath(allowed or gradio_cache_dir())
        self.max_upload_bytes = max_upload_bytes

    def allows(self, target: str) -> bool:
        """True when the file route may serve ``target`` (a path as the route receives it)."""
        if not target or "\x00" in target or "://" in target:
            return False
        try:
            real = os.path.realpath(target)  # resolves "..", relative paths (against the cwd) and symlinks
        except (OSError, ValueError):
            return False
        return _inside(real, self.allowed) and not _inside(real, self.protected)

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        target = file_route_target(path)
        if target is not None:
            if not self.allows(target):
                return await _refuse(send, 403, b"File not allowed.")
            return await self.app(scope, receive, _as_download(send))
        if self.max_upload_bytes is not None and _UPLOAD_ROUTE.match(path) and scope.get("method") == "POST":
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is None or not length.isdigit() or int(length) > self.max_upload_bytes:
                mb = self.max_upload_bytes / 2**20
                return await _refuse(send, 413, (f"Upload refused: it is larger than this app's limit of "
                                                 f"{mb:g} MB (or its size is not declared).").encode())
        return await self.app(scope, receive, send)


def _as_download(send):
    """Wraps ``send`` so the response start carries ``Content-Disposition: attachment`` and ``nosniff``."""

    async def wrapped(message):
        if message.get("type") == "http.response.start":
            headers, disposition = [], b"attachment"
            for k, v in message.get("headers", []):
                if k.lower() == b"content-disposition":  # keep Gradio's filename=..., make it a download
                    disposition = b"attachment" + (v[v.index(b";"):] if b";" in v else b"")
                elif k.lower() != b"x-content-type-options":
                    headers.append((k, v))
            headers += [(b"content-disposition", disposition), (b"x-content-type-options", b"nosniff")]
            message = {**message, "headers": headers}
        await send(message)

    return wrapped


async def _refuse(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()),
                            (b"x-content-type-options", b"nosniff")]})
    await send({"type": "http.response.body", "body": body})
