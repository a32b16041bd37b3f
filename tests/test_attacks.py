"""Issue 11 points 2, 3, 6, 7 and issue 14 point 1: a table of attacks against one real ``python app.py``.

One app process for the module (its own Gradio cache folder, small operator limits). A victim client uploads three
photos and trains a 2-step run; an attacker, with raw HTTP and ``gradio_client``, then tries every Gradio file
route on the victim's photo, the victim's run file and the app's own source, uploads HTML/SVG/JS, sends
operator-only fields, replays the victim's ids, reuses a removed photo's URL, posts an oversize upload and a
zip bomb of small entries. Each must fail as it should. The positive checks: the owner gets its files, every
download is ``attachment`` + ``nosniff``, and the Download area's zip holds the run's files, each of which loads.
"""
from __future__ import annotations

import io
import json
import os
import uuid
import zipfile
from urllib.parse import quote

import httpx
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from app_fixtures import REPO, call, make_images, start_app, stop_app, wait_for
from ui.allowlist import APP_FIELDS, OPERATOR_FIELDS

MAX_UPLOAD_MB = 2
MAX_UPLOAD_FILES = 5
MAX_IMAGES = 8


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attacks")
    cache = str(tmp / "gradio-cache")
    server = start_app(str(tmp), step_delay=0.0, env={"GRADIO_TEMP_DIR": cache},
                       args=("--max-steps", "60", "--max-upload-mb", str(MAX_UPLOAD_MB),
                             "--max-upload-files", str(MAX_UPLOAD_FILES), "--max-images", str(MAX_IMAGES)))
    server.cache = os.path.realpath(cache)
    server.tmp = str(tmp)
    yield server
    stop_app(server)


def client(app, **kw) -> Client:
    return Client(app.url, verbose=False, download_files=False, **kw)


def url_of(app, filedata) -> str:
    """The URL a file output is served at (what the browser would fetch)."""
    url = filedata.get("url") or f"{app.url}/gradio_api/file={filedata['path']}"
    return url if url.startswith("http") else app.url + url


@pytest.fixture(scope="module")
def victim(app):
    """A session with three photos and a finished 2-step run; its files on disk and its served URLs."""
    c = client(app)
    photos = make_images(os.path.join(app.tmp, "victim"), 3)
    c.predict([handle_file(p) for p in photos], api_name="/upload_images")
    gallery, _ = c.predict(api_name="/list_dataset")
    out = call(c, "/start_training", run_name="victim-run", concept="object", trigger="TOK", base_model="tiny-sdxl",
               max_train_steps=2, checkpointing_steps=1000, validation_steps=2, num_validation_images=1,
               validation_inference_steps=2)
    assert "submitted" in out[0], out[0]
    s = wait_for(c, lambda s: s["state"] in ("finished", "failed"), timeout=240, what="the victim's run")
    assert s["state"] == "finished", s
    session = os.path.join(app.root, "sessions", c.session_hash)
    photo = os.path.join(session, "uploads", sorted(n for n in os.listdir(os.path.join(session, "uploads"))
                                                    if n.endswith(".png"))[0])
    run_file = os.path.join(session, "runs", "victim-run", "pytorch_lora_weights.safetensors")
    assert os.path.isfile(photo) and os.path.isfile(run_file)
    return {"client": c, "photo": photo, "run_file": run_file, "gallery": gallery, "photos": photos}


# ----- every file route, for another session's photo, its run file, and the app's source ------------------------
def _routes(app, target: str) -> dict[str, str]:
    rel_cache = os.path.relpath(target, app.cache)  # "../../..": climbs out of the cache folder
    return {
        "file=": f"/gradio_api/file={target}",
        "old file=": f"/file={target}",
        "file/": f"/gradio_api/file/{target}",
        "old file/": f"/file/{target}",
        "percent-encoded": "/gradio_api/file=" + quote(target, safe=""),
        "double-encoded": "/gradio_api/file=" + quote(quote(target, safe=""), safe=""),
        "relative .. from the cache": f"/gradio_api/file={app.cache}/{rel_cache}",
        "relative to the app's folder": "/gradio_api/file=" + os.path.relpath(target, REPO),
        "symlink in the cache": "symlink",
    }


ROUTES = list(_routes(type("A", (), {"cache": "/c"})(), "/t/x").keys())
TARGETS = ["photo", "run_file", "app_source"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("route", ROUTES)
def test_no_file_route_serves_another_sessions_files_or_the_source(app, victim, route, target):
    path = {"photo": victim["photo"], "run_file": victim["run_file"], "app_source": os.path.join(REPO, "app.py")}[
        target]
    url = _routes(app, path)[route]
    if url == "symlink":  # a link planted inside Gradio's cache, pointing at the file
        link = os.path.join(app.cache, f"link-{uuid.uuid4().hex}{os.path.splitext(path)[1]}")
        os.symlink(path, link)
        url = f"/gradio_api/file={link}"
    r = httpx.get(app.url + url, timeout=20)  # an attacker's fresh connection: no cookie, no session
    assert r.status_code in (403, 404), (route, target, r.status_code, r.content[:100])
    with open(path, "rb") as f:
        assert f.read()[:64] not in r.content or not r.content


# ----- uploads that a browser would run --------------------------------------------------------------------------
@pytest.mark.parametrize("name,content", [
    ("evil.html", "png"), ("evil.svg", "<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>"),
    ("evil.js", "png"), ("evil.xhtml", "png")])
def test_uploads_a_browser_would_run_are_refused_by_name(app, tmp_path, name, content):
    p = tmp_path / name
    if content == "png":  # a valid PNG under a page's name
        Image.new("RGB", (64, 64), (200, 10, 10)).save(p, format="PNG")
    else:
        p.write_text(content)
    c = client(app)
    out = c.predict([handle_file(str(p))], api_name="/upload_images")
    assert "Added **0**" in out[3] and name in out[3] and "not an image file" in out[3] or "format" in out[3], out[3]
    uploads = os.path.join(app.root, "sessions", c.session_hash, "uploads")
    assert not [n for n in os.listdir(uploads) if not n.startswith(".") and n != "metadata.jsonl"]


def test_a_misnamed_photo_is_kept_under_its_real_extension(app, tmp_path):
    p = tmp_path / "holiday.png"
    Image.new("RGB", (80, 80), (10, 200, 10)).save(p, format="JPEG")
    c = client(app)
    out = c.predict([handle_file(str(p))], api_name="/upload_images")
    assert "Added **1**" in out[3], out[3]
    uploads = os.path.join(app.root, "sessions", c.session_hash, "uploads")
    assert "holiday.jpg" in os.listdir(uploads)


# ----- operator-only fields -------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", sorted(OPERATOR_FIELDS + tuple(n for n in APP_FIELDS
                                                                  if n != "pretrained_model_name_or_path")))
def test_operator_only_fields_are_not_parameters_of_start_training(app, field):
    c = client(app)
    with pytest.raises(TypeError, match=field):
        call(c, "/start_training", run_name="x", concept="face", trigger="TOK", base_model="tiny-sdxl",
             **{field: "/tmp/escape" if "dir" in field else True})


# ----- sessions: ids that are not yours open nothing -------------------------------------------------------------
def _load_dep(app) -> tuple[int, int]:
    cfg = httpx.get(app.url + "/config", timeout=20).json()
    for dep in cfg["dependencies"]:
        if any(t[1] == "load" for t in dep.get("targets", [])) and dep.get("api_visibility") == "private":
            return dep["id"], dep["targets"][0][0]
    raise AssertionError("no load event in /config")


def browser_load(app, http: httpx.Client, saved) -> tuple[str, str]:
    """What a browser does on page load: the private load event with its BrowserState; -> (workspace, hash)."""
    fn, trigger = _load_dep(app)
    session = uuid.uuid4().hex[:11]
    body = {"data": [saved], "fn_index": fn, "trigger_id": trigger, "session_hash": session, "event_data": None}
    r = http.post(app.url + "/gradio_api/queue/join", json=body, timeout=20)
    assert r.status_code == 200, r.text
    with http.stream("GET", f"{app.url}/gradio_api/queue/data", params={"session_hash": session},
                     timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    assert msg.get("success"), msg
                    return msg["output"]["data"][1], session  # [gr.State (not sent), gr.BrowserState]
    raise AssertionError("the load event never completed")


@pytest.fixture(scope="module")
def browser_victim(app):
    http = httpx.Client()
    assert http.get(app.url + "/").status_code == 200 and "ls_browser" in http.cookies
    ws, session = browser_load(app, http, None)
    assert ws and len(ws) >= 32 and ws != session
    assert browser_load(app, http, ws)[0] == ws  # a reload in the same browser keeps the workspace
    return {"http": http, "ws": ws, "session": session}


def test_workspace_ids_are_secrets_not_in_the_config(app, browser_victim):
    assert browser_victim["ws"] not in httpx.get(app.url + "/config", timeout=20).text


@pytest.mark.parametrize("attacker_has_own_cookie", [False, True])
def test_a_stolen_workspace_id_opens_nothing_in_another_browser(app, browser_victim, attacker_has_own_cookie):
    http = httpx.Client()
    if attacker_has_own_cookie:
        http.get(app.url + "/")
    ws, _ = browser_load(app, http, browser_victim["ws"])
    assert ws != browser_victim["ws"]


def test_a_replayed_session_hash_without_the_browsers_cookie_is_refused(app, browser_victim):
    c = client(app)
    c.session_hash = browser_victim["session"]  # the victim page's session: its state holds the workspace
    with pytest.raises(Exception, match="another browser"):
        c.predict(api_name="/list_dataset")


def test_an_api_client_naming_a_browsers_workspace_is_refused(app, browser_victim):
    c = client(app)
    c.session_hash = browser_victim["ws"]
    with pytest.raises(Exception, match="another browser"):
        c.predict(api_name="/list_dataset")


# ----- removed photos, oversize uploads, zip bombs -------------------------------------------------------------
def test_a_removed_photos_url_answers_404(app, tmp_path):
    c = client(app)
    c.predict([handle_file(p) for p in make_images(str(tmp_path / "i"), 1)], api_name="/upload_images")
    gallery, _ = c.predict(api_name="/list_dataset")
    url = url_of(app, gallery[0]["image"])
    assert httpx.get(url, timeout=20).status_code == 200
    c.predict(api_name="/clear_dataset")
    assert httpx.get(url, timeout=20).status_code in (403, 404)


def _cache_files(app) -> set:
    out = set()
    for d, _dirs, files in os.walk(app.cache):
        out |= {os.path.join(d, f) for f in files}
    return out


@pytest.mark.parametrize("declared", [True, False])
def test_an_oversize_anonymous_upload_is_refused_and_leaves_no_temp_file(app, declared):
    before = _cache_files(app)
    blob = os.urandom((MAX_UPLOAD_MB + 1) * 2**20)
    if declared:
        r = httpx.post(app.url + "/gradio_api/upload", files={"files": ("big.png", blob, "image/png")}, timeout=60)
    else:  # chunked: no Content-Length to check
        def body():
            yield b"--x\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n\r\n"
            yield blob
            yield b"\r\n--x--\r\n"
        r = httpx.post(app.url + "/gradio_api/upload", content=body(), timeout=60,
                       headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413, (r.status_code, r.text[:200])
    assert "limit" in r.text
    assert _cache_files(app) - before == set()


def test_more_files_than_the_limit_in_one_upload_are_refused(app, tmp_path):
    c = client(app)
    out = c.predict([handle_file(p) for p in make_images(str(tmp_path / "i"), MAX_UPLOAD_FILES + 1)],
                    api_name="/upload_images")
    assert "Added **0**" in out[3] and f"at most {MAX_UPLOAD_FILES}" in out[3], out[3]


def test_the_dataset_holds_at_most_the_limit(app, tmp_path):
    c = client(app)
    for k in range(2):
        out = c.predict([handle_file(p) for p in make_images(str(tmp_path / f"i{k}"), MAX_UPLOAD_FILES)],
                        api_name="/upload_images")
    assert f"dataset has **{MAX_IMAGES}**" in out[3] and f"at most {MAX_IMAGES} images" in out[3], out[3]


def test_a_zip_bomb_of_small_entries_writes_nothing(app, tmp_path):
    p = tmp_path / "bomb.zip"
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i in range(300):  # 300 x 900 KiB of zeros: each entry under 1 MiB, the zip about 300 KB
            zf.writestr(f"img{i}.png", b"\0" * (900 * 1024))
    assert p.stat().st_size < 1.5 * 2**20
    c = client(app)
    out = c.predict([handle_file(str(p))], api_name="/upload_images")
    assert "Added **0**" in out[3] and "zip bomb" in out[3], out[3][:500]
    session = os.path.join(app.root, "sessions", c.session_hash)
    written = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(session) for f in fs)
    assert written < 2**20, written


# ----- what the owner gets ----------------------------------------------------------------------------------------
def test_the_owner_gets_its_photo_as_a_download(app, victim):
    r = httpx.get(url_of(app, victim["gallery"][0]["image"]), timeout=20)
    assert r.status_code == 200
    assert r.headers["content-disposition"].startswith("attachment")
    assert r.headers["x-content-type-options"] == "nosniff"
    with open(victim["photos"][0], "rb") as f:
        assert r.content == f.read()


def test_the_download_area_serves_the_runs_files_and_a_zip_that_loads(app, victim, tmp_path):
    from safetensors.torch import load_file

    c = victim["client"]
    c.predict(api_name="/list_runs")  # the run dropdown's choices, as the Generate tab's refresh fills them
    files, samples, info = c.predict(run="victim-run", api_name="/download_files")
    names = [os.path.basename(f["path"]) for f in files]
    assert "pytorch_lora_weights.safetensors" in names and "README.md" in names and "victim-run-lora.zip" in names
    assert any(n.endswith("_emb.safetensors") for n in names) and len(names) == 5, names
    assert samples, "the run's sample images"
    got = {}
    for f in files:
        r = httpx.get(url_of(app, f), timeout=60)
        assert r.status_code == 200, (f, r.status_code)
        assert r.headers["content-disposition"].startswith("attachment") and \
            r.headers["x-content-type-options"] == "nosniff"
        got[os.path.basename(f["path"])] = r.content
    with zipfile.ZipFile(io.BytesIO(got["victim-run-lora.zip"])) as zf:
        inside = zf.namelist()
        zf.extractall(tmp_path / "unzipped")
    assert set(names) - {"victim-run-lora.zip"} <= set(inside) and any(n.startswith("samples/") for n in inside)
    for n in inside:
        if n.endswith(".safetensors"):
            assert load_file(str(tmp_path / "unzipped" / n))
            assert (tmp_path / "unzipped" / n).read_bytes() == got[n]
    from diffusers import StableDiffusionXLPipeline
    from trainer.tiny import tiny_model_path

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_path("tiny-sdxl"))
    pipe.load_lora_weights(str(tmp_path / "unzipped"), weight_name="pytorch_lora_weights.safetensors")
    assert pipe.get_list_adapters()
    other = client(app)  # another session asking for the same run name gets nothing
    other.predict(api_name="/list_runs")
    try:
        files_b, samples_b, _ = other.predict(run="victim-run", api_name="/download_files")
    except Exception as e:  # not one of its runs: refused
        assert "victim-run" in str(e) or "choices" in str(e), e
    else:
        assert not files_b and not samples_b


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed")
def test_a_real_browser_sees_its_thumbnails_and_keeps_its_workspace(app, tmp_path, page):
    """Downloads-only answers still show as images; the cookie binding keeps a reload's workspace.
    (pytest-playwright's page: a second sync_playwright in one session fails on its running loop.)"""
    from playwright.sync_api import expect

    photos = make_images(str(tmp_path / "mine"), 3)
    before = set(os.listdir(os.path.join(app.root, "sessions")))
    page.set_default_timeout(60_000)
    page.goto(app.url)
    page.locator("#ls-upload input[type=file]").set_input_files(photos)
    expect(page.locator("#ls-upload-msg")).to_contain_text("Added 3 image", timeout=60_000)
    imgs = page.locator(".ls-card-img img")
    expect(imgs).to_have_count(3, timeout=60_000)
    page.wait_for_function("() => [...document.querySelectorAll('.ls-card-img img')].every("
                           "i => i.complete && i.naturalWidth > 0)")
    cookie = [c for c in page.context.cookies() if c["name"] == "ls_browser"]
    assert cookie and cookie[0]["httpOnly"]
    mine = set(os.listdir(os.path.join(app.root, "sessions"))) - before
    assert len(mine) == 1 and len(next(iter(mine))) >= 32  # a secret id, not the page's session hash
    page.reload()
    expect(page.locator(".ls-card-img img")).to_have_count(3, timeout=60_000)
    assert set(os.listdir(os.path.join(app.root, "sessions"))) - before == mine
