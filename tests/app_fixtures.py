"""Shared fixtures of the app tests: a real ``python app.py`` on a free local port, fully offline."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
    "GRADIO_SSR_MODE": "False",
}
for _k, _v in OFFLINE_ENV.items():  # the test process talks to the app too (gradio_client)
    os.environ.setdefault(_k, _v)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_cache_dir() -> str:
    """One cache of tiny models for every test session (built once)."""
    d = os.environ.get("LORA_STUDIO_CACHE") or os.path.join(REPO, ".cache", "lora-studio-tests")
    os.makedirs(d, exist_ok=True)
    return d


class AppServer:
    def __init__(self, url: str, root: str, proc: subprocess.Popen, log_path: str):
        self.url, self.root, self.proc, self.log_path = url, root, proc, log_path

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-5000:]
        except OSError:
            return ""


def start_app(tmp_root: str, step_delay: float = 0.15, timeout: float = 120, env: dict | None = None,
              args: tuple = ()) -> AppServer:
    """``python app.py`` (with a per-step delay) on a free port; ``env`` entries are added (None removes one),
    ``args`` are extra app flags."""
    port = free_port()
    extra = env or {}
    env = dict(os.environ, **OFFLINE_ENV, LORA_STUDIO_CACHE=shared_cache_dir(), TEST_STEP_DELAY=str(step_delay),
               PYTHONUNBUFFERED="1")
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    env.pop("GRADIO_SERVER_NAME", None)
    env.pop("GRADIO_SERVER_PORT", None)
    log_path = os.path.join(tmp_root, "app.log")
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "fixtures", "app_with_step_delay.py"), "--port", str(port), "--root",
                             os.path.join(tmp_root, "outputs"), *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    server = AppServer(url, os.path.join(tmp_root, "outputs"), proc, log_path)
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}:\n{server.log()}")
        try:
            with urllib.request.urlopen(url + "/gradio_api/info", timeout=2) as r:
                if r.status == 200:
                    return server
        except Exception:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"app.py did not answer in {timeout}s:\n{server.log()}")


def stop_app(server: AppServer) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.proc.kill()


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    server = start_app(str(tmp_path_factory.mktemp("app")))
    yield server
    stop_app(server)


def make_images(folder: str, n: int = 4) -> list[str]:
    """``n`` small, clearly different photos-to-be (gradients and shapes), a few aspect ratios."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        w, h = [(96, 96), (128, 96), (96, 128), (112, 112)][i % 4]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (i + 1) * 2) % 256, (yy * (i + 3)) % 256, ((xx + yy) * (5 - i % 5)) % 256], -1)
        noise = rng.integers(0, 40, size=(h, w, 3))
        arr = np.clip(base + noise, 0, 255).astype("uint8")
        arr[h // 4: h // 2, w // 3: 2 * w // 3] = [(50 * i) % 256, 200, 30]
        p = os.path.join(folder, f"photo {i}.png")
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


@pytest.fixture
def images(tmp_path) -> list[str]:
    return make_images(str(tmp_path / "imgs"))


def call(client, api_name, **kwargs):
    """predict() by keyword, giving None to the parameters without a default (empty optional numbers)."""
    params = client.view_api(print_info=False, return_format="dict")["named_endpoints"][api_name]["parameters"]
    for p in params:
        if not p.get("parameter_has_default") and p["parameter_name"] not in kwargs:
            kwargs[p["parameter_name"]] = None
    return client.predict(api_name=api_name, **kwargs)


def status(client) -> dict:
    """The app's /training_status for this client's session."""
    return client.predict(api_name="/training_status")


def wait_for(client, pred, timeout=120, what="condition"):
    """Poll /training_status until ``pred(status)`` holds; the last status in the error on timeout."""
    end, last = time.time() + timeout, None
    while time.time() < end:
        last = status(client)
        if pred(last):
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}; last status: {last}")
