"""Issue 11: the app tried as an attacker would, against a real ``python app.py`` (gradio_client and raw HTTP).

The server runs with its own ``HF_TOKEN`` and ``HF_ENDPOINT`` pointing at a fake Hub on 127.0.0.1 that records
every request: a visitor's action must never reach it with the server's token.
"""
from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from gradio_client import Client, handle_file

from app_fixtures import call, make_images, start_app, status, stop_app, wait_for
from ui.allowlist import APP_FIELDS, OPERATOR_FIELDS, VISITOR_FIELDS

SERVER_TOKEN = "hf_server_owner_secret_0123456789"
VISITOR_TOKEN = "hf_visitor_typed_token_987654"
MAX_STEPS = 60


class FakeHub:
    """A Hub stand-in that records (method, path, Authorization) of every request and answers 401."""

    def __init__(self):
        self.requests: list[tuple[str, str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                hub.requests.append((self.command, self.path, self.headers.get("Authorization", "")))
                body = b'{"error": "Invalid credentials"}'
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_HEAD = _answer

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def hub():
    h = FakeHub()
    yield h
    h.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory, hub):
    env = {"HF_TOKEN": SERVER_TOKEN, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None}
    server = start_app(str(tmp_path_factory.mktemp("security_app")), step_delay=0.0, env=env,
                       args=("--max-steps", str(MAX_STEPS)))
    yield server
    stop_app(server)


def api_params(client, name):
    return [p["parameter_name"] for p in
            client.view_api(print_info=False, return_format="dict")["named_endpoints"][name]["parameters"]]



def server_token_seen(hub) -> list:
    return [r for r in hub.requests if SERVER_TOKEN in r[2]]


# ----- 1. the allowlist -------------------------------------------------------------------------------------
def test_start_training_takes_only_the_visitor_fields(app):
    c = Client(app.url, verbose=False)
    params = api_params(c, "/start_training")
    assert params[:4] == ["run_name", "concept", "trigger", "base_model"]
    assert set(params[4:]) == set(VISITOR_FIELDS)
    for name in OPERATOR_FIELDS + tuple(n for n in APP_FIELDS if n != "pretrained_model_name_or_path"):
        with pytest.raises(TypeError, match=name):
            call(c, "/start_training", run_name="x", concept="face", trigger="TOK", base_model="tiny-sdxl",
                 **{name: True})


def test_models_outside_the_operators_lists_are_refused(app, tmp_path):
    c = Client(app.url, verbose=False)
    for bad in ("/etc", ".", "../..", "some/other-model"):
        with pytest.raises(Exception, match="not in the list of choices"):
            call(c, "/start_training", run_name="x", concept="face", trigger="TOK", base_model=bad)
    c.predict([handle_file(p) for p in make_images(str(tmp_path / "i"), 1)], api_name="/upload_images")
    with pytest.raises(Exception) as ei:
        c.predict(model=".", concept="face", trigger="TOK", overwrite=True, api_name="/auto_caption")
    msg = str(ei.value)
    # refused by the caption model dropdown's choices (or by the allowlist behind it), never with a server folder
    assert ("not offered" in msg or "not in the list of choices" in msg) and os.getcwd() not in msg \
        and "tiny-blip" in msg, msg
    assert status(c)["state"] == "none"


def test_steps_over_the_operators_limit_are_refused(app, tmp_path):
    c = Client(app.url, verbose=False)
    c.predict([handle_file(p) for p in make_images(str(tmp_path / "i"), 2)], api_name="/upload_images")
    out = call(c, "/start_training", run_name="big", concept="face", trigger="TOK", base_model="tiny-sdxl",
               max_train_steps=MAX_STEPS + 1)
    assert "limit of 60" in out[0], out[0]
    out = call(c, "/start_training", run_name="big", concept="face", trigger="TOK", base_model="tiny-sdxl",
               max_train_steps=None, steps_per_image=MAX_STEPS)  # 120 steps asked for another way
    assert "120 steps" in out[0] and "limit" in out[0], out[0]
    assert status(c)["state"] == "none"


def test_extra_raw_values_set_nothing_and_the_server_token_is_never_spent(app, hub, tmp_path):
    """A raw POST carrying Hub-push settings after the form's values: the run trains with the app's own
    (no push, no tracker, paths inside the run folder) and the fake Hub sees no request at all; Publish
    without a typed token is refused; with one, only that token reaches the Hub."""
    c = Client(app.url, verbose=False)
    c.predict([handle_file(p) for p in make_images(str(tmp_path / "i"), 3)], api_name="/upload_images")
    params = api_params(c, "/start_training")
    given = {"run_name": "raw", "concept": "object", "trigger": "TOK", "base_model": "tiny-sdxl",
             "max_train_steps": 2, "checkpointing_steps": 1000, "validation_steps": 1000,
             "num_validation_images": 1, "validation_inference_steps": 2}
    from ui.train_tab import preset_ui_values

    defaults = preset_ui_values("object")
    data = [given.get(n, defaults.get(n)) for n in params]
    data += [{"push_to_hub": True, "hub_model_id": "owner/their-model", "report_to": "wandb",
              "logging_dir": "/tmp/escape", "output_dir": "/tmp/escape"}, True, "owner/their-model"]
    body = json.dumps({"data": data, "session_hash": c.session_hash}).encode()
    req = urllib.request.Request(app.url + "/gradio_api/call/start_training", data=body,
                                 headers={"Content-Type": "application/json"})
    event = json.load(urllib.request.urlopen(req, timeout=30))["event_id"]
    text = urllib.request.urlopen(f"{app.url}/gradio_api/call/start_training/{event}", timeout=60).read().decode()
    assert "submitted" in text, text[:500]
    run_dir = os.path.join(app.root, "sessions", c.session_hash, "runs", "raw")
    s = wait_for(c, lambda s: s["state"] in ("finished", "failed"), timeout=180, what="finish")
    assert s["state"] == "finished", s
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    assert cfg["push_to_hub"] is False and cfg["hub_model_id"] is None and cfg["report_to"] == "none"
    assert os.path.realpath(cfg["output_dir"]) == os.path.realpath(run_dir) and cfg["logging_dir"] == "logs"
    assert not os.path.exists("/tmp/escape")
    assert hub.requests == [], hub.requests  # the run itself never talked to the Hub

    res = c.predict(run="raw", token="", repo="owner/their-model", private=True, api_name="/push_to_hub")
    assert "token" in res and "Error" in res and hub.requests == []
    res = c.predict(run="raw", token=VISITOR_TOKEN, repo="me/mine", private=True, api_name="/push_to_hub")
    assert "rejected the token" in res and VISITOR_TOKEN not in res, res
    assert hub.requests and not server_token_seen(hub)
    assert all(r[2] == f"Bearer {VISITOR_TOKEN}" for r in hub.requests), hub.requests


# ----- 6. a full disk during an upload; 7. safetensors only (in-process, at the named points) -----------------
def _noise_png(path, side=420, seed=0):
    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, size=(side, side, 3), dtype="uint8")  # incompressible
    Image.fromarray(arr).save(path)
    return str(path)


def _dataset_files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def test_a_full_disk_during_an_upload_says_so_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno

    import uploads.store
    from uploads.ingest import ingest_files

    srcs = [_noise_png(tmp_path / f"p{i}.png", 64, i) for i in range(3)]
    dest = tmp_path / "uploads"
    dest.mkdir()
    calls = []

    def write_bytes(src, dst):  # the second file hits a full disk halfway through its bytes
        calls.append(1)
        if len(calls) == 2:
            dst.write(src.read(100))
            raise OSError(errno.ENOSPC, "No space left on device", "/srv/secret/uploads/.p1.png.part")
        return real(src, dst)

    real = uploads.store.write_bytes
    monkeypatch.setattr(uploads.store, "write_bytes", write_bytes)
    added, problems, _ = ingest_files(srcs, str(dest))
    assert [os.path.basename(a) for a in added] == ["p0.png"]
    assert [p["code"] for p in problems] == ["disk_full"]
    msg = problems[0]["message"] + problems[0]["fix"]
    assert "disk is full" in msg and "/srv" not in msg and str(tmp_path) not in msg
    assert _dataset_files(dest) == ["p0.png"]  # no half-written p1.png, no .part file


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB tmpfs (needs root); skipped where mounting is not allowed."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_uploads_onto_a_real_full_disk(tmp_path, small_disk):
    import zipfile

    from uploads.ingest import ingest_files

    srcs = [_noise_png(tmp_path / f"p{i}.png", seed=i) for i in range(4)]  # ~530 KB each: the 2nd does not fit
    dest = small_disk / "uploads"
    dest.mkdir()
    added, problems, _ = ingest_files(srcs, str(dest))
    assert len(added) == 1 and [p["code"] for p in problems] == ["disk_full"], problems
    assert "disk is full" in problems[0]["message"] and str(small_disk) not in problems[0]["message"]
    assert _dataset_files(dest) == ["p0.png"]
    os.remove(dest / "p0.png")
    zpath = tmp_path / "photos.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_STORED) as zf:
        for s in srcs:
            zf.write(s, os.path.basename(s))
    added, problems, _ = ingest_files([str(zpath)], str(dest))
    assert any(p["code"] == "disk_full" for p in problems), problems
    assert all(str(small_disk) not in p["message"] for p in problems)
    assert all(not n.endswith(".part") and not n.startswith(".zip-") for n in os.listdir(dest)), os.listdir(dest)


def test_base_models_load_safetensors_only(tmp_path, tiny_sd):
    import glob
    import shutil

    from diffusers import UNet2DConditionModel

    from generation import Engine, InferenceInputError
    from trainer.families import detect_family
    from trainer.families.loading import ModelLoadError, load_parts

    pickled = str(tmp_path / "pickled-sd")
    shutil.copytree(tiny_sd, pickled)
    unet = UNet2DConditionModel.from_pretrained(pickled, subfolder="unet")
    for f in glob.glob(os.path.join(pickled, "unet", "*.safetensors")):
        os.remove(f)
    unet.save_pretrained(os.path.join(pickled, "unet"), safe_serialization=False)  # a pickled .bin only
    assert os.path.isfile(os.path.join(pickled, "unet", "diffusion_pytorch_model.bin"))
    with pytest.raises(ModelLoadError, match="no .safetensors weights") as ei:
        load_parts(detect_family(pickled), pickled)
    assert os.path.join(pickled, "unet") not in str(ei.value)
    with pytest.raises(InferenceInputError, match="no .safetensors weights") as ei:
        Engine()._ensure_pipeline(pickled)
    assert os.path.join(pickled, "unet") not in str(ei.value)


def test_the_idle_cleaner_deletes_the_served_copies_too(tmp_path):
    from ui.file_guard import SessionFiles
    from ui.sessions import Workspaces

    ws = Workspaces(str(tmp_path / "root"), max_idle_s=60)
    files = SessionFiles(ws.sessions_root, cache_dir=str(tmp_path / "cache"))
    ws.on_clean.append(files.purge)
    sid = ws.new_id()
    photo = _noise_png(os.path.join(ws.uploads_dir(sid), "me.png"), 32)
    copy = files.copy_for(sid, photo)
    assert copy and os.path.isfile(copy) and copy.startswith(str(tmp_path / "cache"))
    assert files.copy_for(sid, photo) == copy  # the same file, the same copy (no growth on every refresh)
    other = files.copy_for(ws.new_id(), photo)
    assert other != copy  # another session never gets the same URL
    assert sid in ws.clean(now=time.time() + 3600)
    assert not os.path.exists(copy) and not os.path.exists(photo)


def test_failure_messages_name_no_server_folder():
    from ui.train_tab import summarize

    err = "OSError: [Errno 28] No space left on device: '/srv/data/sessions/abc/runs/r/checkpoints/step-2/x.pt'"
    s = summarize({"state": "failed", "run": "r", "position": 0, "events": [{"type": "failed", "error": err}]})
    assert "No space left" in s["error"] and "/srv" not in s["error"] and "/srv" not in "\n".join(s["log"])
