"""Each run trains on its own frozen copy of the dataset (issue 11 point 4), against a real ``python app.py``.

A run is held at a named gate (tests/fixtures/app_hooks.py) while the session removes every image, uploads,
edits captions and auto-captions; its LoRA must equal a run of the same seed on the untouched dataset, and the
edits must be what the next run gets. Auto-caption merges into the captions as they are when it writes (an edit
made while it captions is kept), and runs on the CPU while a training holds the (injected) GPU.
"""
from __future__ import annotations

import os
import time

import pytest
import torch
from gradio_client import Client, handle_file
from safetensors.torch import load_file

from app_fixtures import call, make_images, start_app, stop_app, wait_for


def wait_file(path: str, timeout: float = 90) -> None:
    end = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > end:
            raise AssertionError(f"{os.path.basename(path)} never appeared")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("frozen")
    gates = root / "gates"
    gates.mkdir()
    server = start_app(str(root), step_delay=0, env={"TEST_GATES": str(gates),
                                                     "TEST_FAKE_CUDA": str(gates / "fake-cuda")})
    server.gates = str(gates)
    yield server
    stop_app(server)


def rows(table) -> list[list]:
    return table["data"] if isinstance(table, dict) else table


def save_captions(c, captions: dict[str, str]) -> str:
    data = {"headers": ["file", "caption"], "data": [[k, v] for k, v in captions.items()]}
    return c.predict(captions=data, api_name="/save_captions")


RUN = dict(concept="face", trigger="TOK", base_model="tiny-sdxl", max_train_steps=4, checkpointing_steps=2,
           seed=11, rank=4, auto_fit=False, validation_prompt="")


def lora_of(server, c, run) -> dict:
    folder = os.path.join(server.root, "sessions", c.session_hash, "runs", run)
    return load_file(os.path.join(folder, "pytorch_lora_weights.safetensors"))


def test_edits_during_a_run_change_the_next_run_not_this_one(app, tmp_path):
    imgs = make_images(str(tmp_path / "imgs"), 4)
    captions = {f"photo_{i}.png": f"a photo of TOK, picture number {i}" for i in range(3)}
    c, ref = Client(app.url, verbose=False), Client(app.url, verbose=False)
    for client in (c, ref):
        table = client.predict([handle_file(p) for p in imgs[:3]], api_name="/upload_images")[2]
        names = [r[0] for r in rows(table)]
        assert len(names) == 3, names
        save_captions(client, dict(zip(names, captions.values())))

    open(os.path.join(app.gates, "edited.step-1.wait"), "w").close()
    out = call(c, "/start_training", run_name="edited", **RUN)
    assert "submitted" in out[0], out[0]
    wait_file(os.path.join(app.gates, "edited.step-1.reached"))
    # the run has trained one step; now every kind of dataset edit
    c.predict(api_name="/clear_dataset")
    _, _, table, msg, *_ = c.predict([handle_file(imgs[3]), handle_file(imgs[0])], api_name="/upload_images")
    names = [r[0] for r in rows(table)]
    assert len(names) == 2, msg
    save_captions(c, {names[0]: "a photo of TOK, my own words"})
    open(os.path.join(app.gates, "fake-cuda"), "w").close()  # the app now believes it has a GPU
    try:
        table, note, *_ = c.predict(model="tiny-blip", concept="face", trigger="TOK", overwrite=False,
                                    api_name="/auto_caption")
    finally:
        os.remove(os.path.join(app.gates, "fake-cuda"))
    assert "on the CPU (a training holds the GPU)" in note, note  # the injected GPU is the training's
    edited = {r[0]: r[1] for r in rows(table)}
    open(os.path.join(app.gates, "edited.step-1.go"), "w").close()
    s = wait_for(c, lambda s: s["state"] in ("finished", "failed"), timeout=120, what="the edited run")
    assert s["state"] == "finished" and s["step"] == 4, s

    out = call(ref, "/start_training", run_name="reference", **RUN)
    assert "submitted" in out[0], out[0]
    s = wait_for(ref, lambda s: s["state"] in ("finished", "failed"), timeout=120, what="the reference run")
    assert s["state"] == "finished", s

    a, b = lora_of(app, c, "edited"), lora_of(app, ref, "reference")
    assert a.keys() == b.keys() and a
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert diff == 0.0, f"the run saw the edits: LoRA differs by {diff}"

    # the edits are the next run's dataset, untouched by the finished run
    _, table = c.predict(api_name="/list_dataset")
    assert {r[0]: r[1] for r in rows(table)} == edited
    assert edited[names[0]] == "a photo of TOK, my own words" and edited[names[1]].startswith("a photo of TOK")
    run_dir = os.path.join(app.root, "sessions", c.session_hash, "runs", "edited")
    assert not os.path.exists(os.path.join(run_dir, "dataset"))  # a finished run's copy of the photos is deleted


def test_auto_caption_keeps_an_edit_made_while_it_captions(app, tmp_path):
    imgs = make_images(str(tmp_path / "imgs"), 4)
    c = Client(app.url, verbose=False)
    table = c.predict([handle_file(p) for p in imgs[:3]], api_name="/upload_images")[2]
    names = [r[0] for r in rows(table)]
    open(os.path.join(app.gates, "caption.before-write.wait"), "w").close()
    try:
        job = c.submit(model="tiny-blip", concept="object", trigger="TOK", overwrite=True, api_name="/auto_caption")
        wait_file(os.path.join(app.gates, "caption.before-write.reached"))
        # Auto-caption has read the captions; the visitor edits one and adds an image meanwhile
        save_captions(c, {names[0]: "a red square on TOK, hand written"})
        c.predict([handle_file(imgs[3])], api_name="/upload_images")
        open(os.path.join(app.gates, "caption.before-write.go"), "w").close()
        table, note, *_ = job.result(timeout=120)
    finally:
        os.remove(os.path.join(app.gates, "caption.before-write.wait"))
    caps = {r[0]: r[1] for r in rows(table)}
    assert len(caps) == 4, caps  # the image uploaded meanwhile is still there
    assert caps[names[0]] == "a red square on TOK, hand written", note  # the edit is not overwritten
    assert all("TOK" in caps[n] for n in names[1:]) and "Kept 1 caption" in note, (caps, note)
    _, table = c.predict(api_name="/list_dataset")
    assert {r[0]: r[1] for r in rows(table)} == caps  # what was written is what the table shows


def test_the_captioner_never_gets_the_gpu_a_training_holds():
    """ui/gpu.py with the GPU injected: CPU while a training holds it; a training waits for a GPU captioner."""
    import threading

    from ui.gpu import GpuArbiter

    gpu = GpuArbiter(cuda=lambda: True)
    with gpu.training():
        with gpu.captioning() as device:
            assert device == "cpu"
    started, waited = threading.Event(), []
    with gpu.captioning() as device:
        assert device == "cuda"
        t = threading.Thread(target=lambda: gpu.training(on_wait=lambda: waited.append(1)).__enter__() or
                             started.set())
        t.start()
        assert not started.wait(0.3)  # the training waits while the captioner holds the GPU
    assert started.wait(5) and waited == [1]
    assert GpuArbiter(cuda=lambda: False).captioning().__enter__() == "cpu"
