"""The app under a burst of generate requests, and the Generate tab's bad uploads, through the API.

One ``python app.py`` (tiny-sdxl, offline). A run is trained through the API first (a few steps); meanwhile a
tiny-sd LoRA is trained with the CLI to be uploaded to the wrong base model.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch
from gradio_client import Client, handle_file
from safetensors.torch import save_file

from app_fixtures import OFFLINE_ENV, REPO, call, start_app, stop_app
from conftest import write_dataset

UPLOADED = "(uploaded LoRA files)"
RUN = "load-run"


def gen_kwargs(**kw):
    base = dict(run=RUN, lora_file=None, embeddings_file=None, lora_base_model="tiny-sdxl", prompt="a photo of TOK",
                negative_prompt="", scheduler="Euler a", steps=2, guidance_scale=5.0, lora_scale=1.0, width=0,
                height=0, seed=1, num_images=1)
    base.update(kw)
    return base


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    data = str(root / "data")
    paths = write_dataset(data, sizes=((64, 64), (80, 64), (64, 80)), captions=["a photo of TOK dog"] * 3)
    # A tiny-sd LoRA for the wrong-model upload, trained by the CLI while the app trains its own run.
    sd_out = root / "run_sd"
    cli = subprocess.Popen([sys.executable, "-m", "trainer", "--pretrained_model_name_or_path", "tiny-sd",
                            "--instance_data_dir", data, "--output_dir", str(sd_out), "--max_train_steps", "2",
                            "--resolution", "64", "--checkpointing_steps", "1000"], cwd=REPO,
                           env=dict(os.environ, **OFFLINE_ENV, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    server = start_app(str(root), step_delay=0.0)
    try:
        c = Client(server.url, verbose=False)
        c.predict([handle_file(p) for p in paths], api_name="/upload_images")
        out = call(c, "/start_training", run_name=RUN, concept="object", trigger="TOK", base_model="tiny-sdxl",
                   max_train_steps=4, checkpointing_steps=1000, validation_steps=1000, num_validation_images=1,
                   validation_inference_steps=2)
        assert "submitted" in out[0], out[0]
        end = time.time() + 300
        while True:
            s = c.predict(api_name="/training_status")
            if s["state"] in ("finished", "failed") or time.time() > end:
                break
            time.sleep(0.5)
        assert s["state"] == "finished", (s, server.log())
        _o, err = cli.communicate(timeout=300)
        assert cli.returncode == 0, err[-3000:]
        yield server, c, root, str(sd_out)
    finally:
        if cli.poll() is None:
            cli.kill()
        stop_app(server)


def test_burst_of_concurrent_generates(setup):
    server, c0, _root, _sd = setup
    pid = server.proc.pid
    c0.predict(api_name="/list_runs")  # the run dropdown of this session learns its choices (as the page does)
    first = call(c0, "/generate", **gen_kwargs(seed=5))  # loads the model once
    assert len(first[0]) == 1
    rss0 = rss_mb(pid)
    n_clients, per_client = 4, 5
    # Each client has its own session; a finished run lives in the session that trained it, so every client uses
    # the run's LoRA file through the upload path, except the first, which uses the run itself.
    run_dir = os.path.join(server.root, "sessions", c0.session_hash, "runs", RUN)
    lora = os.path.join(run_dir, "pytorch_lora_weights.safetensors")
    clients = [c0] + [Client(server.url, verbose=False) for _ in range(n_clients - 1)]
    for cl in clients[1:]:
        cl.predict(api_name="/list_runs")
    results, errors, info_ok = [], [], []
    lock = threading.Lock()

    def worker(ci: int, client: Client):
        try:
            jobs = []
            for k in range(per_client):
                kw = gen_kwargs(seed=100 * ci + k)
                if ci:
                    kw.update(run=UPLOADED, lora_file=handle_file(lora))
                jobs.append(client.submit(api_name="/generate", **kw))
            for j in jobs:
                gallery, md = j.result(timeout=300)
                with lock:
                    results.append((ci, gallery, md))
        except Exception as e:  # noqa: BLE001
            with lock:
                errors.append(f"client {ci}: {type(e).__name__}: {e}")

    t0 = time.time()
    threads = [threading.Thread(target=worker, args=(i, cl)) for i, cl in enumerate(clients)]
    for t in threads:
        t.start()
    peak = rss0
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss_mb(pid))
        try:  # the server keeps answering while the queue is full
            with urllib.request.urlopen(server.url + "/gradio_api/info", timeout=10) as r:
                info_ok.append(r.status == 200)
        except Exception as e:  # noqa: BLE001
            info_ok.append(False)
            errors.append(f"/gradio_api/info: {e}")
        time.sleep(0.5)
    for t in threads:
        t.join()
    elapsed = time.time() - t0
    rss1 = rss_mb(pid)
    print(f"20 generates: {elapsed:.1f}s; RSS {rss0:.0f} -> peak {peak:.0f} -> {rss1:.0f} MB")
    assert not errors, errors
    assert len(results) == n_clients * per_client
    for ci, gallery, md in results:
        assert len(gallery) == 1 and os.path.isfile(gallery[0]["image"]) and "Seeds used" in md
    assert info_ok and all(info_ok)
    assert peak - rss0 < 1500, (rss0, peak)
    assert server.proc.poll() is None
    assert c0.predict(api_name="/training_status")["state"] == "finished"


def test_generate_bad_uploads_give_clear_messages(setup, tmp_path):
    server, _c0, _root, sd_run = setup
    c = Client(server.url, verbose=False)
    c.predict(api_name="/list_runs")
    ckpt = tmp_path / "my_lora.ckpt"
    torch.save({"x": torch.zeros(1)}, ckpt)
    text = tmp_path / "notes.safetensors"
    text.write_text("this is a text file, not tensors\n" * 10)
    wide = tmp_path / "wide_emb.safetensors"
    save_file({"clip_l": torch.randn(2, 24), "clip_g": torch.randn(2, 24)}, str(wide))
    sd_lora = os.path.join(sd_run, "pytorch_lora_weights.safetensors")
    xl_run = os.path.join(server.root, "sessions", _c0.session_hash, "runs", RUN)
    xl_lora = os.path.join(xl_run, "pytorch_lora_weights.safetensors")
    cases = [
        # Gradio's own file_types check answers first (the engine would say the same, naming the file).
        (dict(lora_file=handle_file(str(ckpt))),
         [r"(my_lora\.ckpt.*not a \.safetensors|Invalid file type.*\.safetensors)"]),
        (dict(lora_file=handle_file(str(text))), [r"notes\.safetensors", "not a valid safetensors"]),
        (dict(lora_file=handle_file(sd_lora)),
         ["pytorch_lora_weights.safetensors", r"(cross-attention width|another model|SD 1\.x)"]),
        (dict(lora_file=handle_file(xl_lora), embeddings_file=handle_file(str(wide))),
         [r"wide_emb\.safetensors", "width 24"]),
        (dict(lora_file=None), ["upload a LoRA"]),
    ]
    for kw, fragments in cases:
        with pytest.raises(Exception) as ei:
            call(c, "/generate", **gen_kwargs(run=UPLOADED, **kw))
        msg = str(ei.value)
        print("generate refused:", msg[:160])
        assert all(re.search(f, msg) for f in fragments), (fragments, msg)
        assert "Traceback" not in msg
        # a normal generate right after works
        gallery, md = call(c, "/generate", **gen_kwargs(run=UPLOADED, lora_file=handle_file(xl_lora), seed=7))
        assert len(gallery) == 1 and "7" in md
    assert server.proc.poll() is None
