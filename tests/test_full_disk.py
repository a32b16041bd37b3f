"""A checkpoint onto a full disk, and Resume of a run whose preflight changed the plan (issue 11 points 4, 6),
against a real ``python app.py`` (tiny-sdxl, a few steps).

* ``TEST_ENOSPC`` (tests/fixtures/app_hooks.py) makes ``optimizer.pt`` of checkpoint 4 fail half-written with
  ``ENOSPC``: the session reads "the disk is full" and what to do, no server path; no part of checkpoint 4 is
  left; Resume continues from checkpoint 2.
* ``TEST_FAKE_PLAN`` makes the real planner halve the batch (a fake probe says batch 2 does not fit): the run's
  ``config.json`` holds the plan, and Resume trains with it without a second preflight.
"""
from __future__ import annotations

import json
import os

import pytest
from gradio_client import Client, handle_file

from app_fixtures import call, make_images, start_app, stop_app, wait_for
from test_frozen_dataset import wait_file
from trainer.events import read_events

RUN = dict(concept="face", trigger="TOK", base_model="tiny-sdxl", checkpointing_steps=2, seed=5, rank=4,
           auto_fit=False, validation_prompt="", train_text_encoder_ti=False)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk")
    gates = root / "gates"
    gates.mkdir()
    server = start_app(str(root), step_delay=0, timeout=300,
                       env={"TEST_GATES": str(gates), "TEST_FAKE_PLAN": str(gates),
                            "TEST_ENOSPC": "full:optimizer.pt:4"})
    server.gates = str(gates)
    yield server
    stop_app(server)


def session_with_images(app, tmp_path) -> Client:
    c = Client(app.url, verbose=False)
    c.predict([handle_file(p) for p in make_images(str(tmp_path / "imgs"), 3)], api_name="/upload_images")
    return c


def test_checkpoint_onto_a_full_disk_says_so_keeps_nothing_half_written_and_resumes(app, tmp_path):
    c = session_with_images(app, tmp_path)
    out = call(c, "/start_training", run_name="full", max_train_steps=6, **RUN)
    assert "submitted" in out[0], out[0]
    s = wait_for(c, lambda s: s["state"] in ("finished", "failed"), timeout=180, what="the full disk")
    assert s["state"] == "failed", s
    err = s["error"]
    assert "the disk is full" in err and "step-4" in err and "(step 2) is intact" in err and "Resume" in err, err
    assert app.root not in err and "/" not in err.replace("--resume_from_checkpoint", ""), err  # no server path
    run_dir = os.path.join(app.root, "sessions", c.session_hash, "runs", "full")
    failed = [e for e in read_events(os.path.join(run_dir, "events.jsonl")) if e["type"] == "failed"][-1]
    assert app.root not in failed["error"] + failed.get("advice", "")
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step-2"]  # nothing of step 4 kept

    out = c.predict(api_name="/resume_training")
    assert "Resuming" in out[0], out[0]
    s = wait_for(c, lambda s: s["state"] in ("finished", "failed"), timeout=180, what="the resume")
    assert s["state"] == "finished" and s["step"] == 6, s
    starts = [e for e in read_events(os.path.join(run_dir, "events.jsonl")) if e["type"] == "started"]
    assert [e["start_step"] for e in starts] == [0, 2]


def test_resume_trains_with_the_saved_plan_without_a_second_preflight(app, tmp_path):
    c = session_with_images(app, tmp_path)
    open(os.path.join(app.gates, "planned.checkpoint-2.wait"), "w").close()
    out = call(c, "/start_training", run_name="planned", max_train_steps=4, **{**RUN, "auto_fit": True,
                                                                               "train_batch_size": 2})
    assert "submitted" in out[0], out[0]
    wait_file(os.path.join(app.gates, "planned.checkpoint-2.reached"))
    c.predict(api_name="/stop_training")
    open(os.path.join(app.gates, "planned.checkpoint-2.go"), "w").close()
    s = wait_for(c, lambda s: s["state"] in ("stopped", "failed", "finished"), timeout=180, what="the stop")
    assert s["state"] == "stopped", s
    run_dir = os.path.join(app.root, "sessions", c.session_hash, "runs", "planned")
    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)
    assert (saved["train_batch_size"], saved["gradient_accumulation_steps"], saved["auto_fit"]) == (1, 2, False)

    out = c.predict(api_name="/resume_training")
    assert "Resuming" in out[0], out[0]
    s = wait_for(c, lambda s: s["state"] in ("finished", "failed"), timeout=180, what="the resume")
    assert s["state"] == "finished" and s["step"] == 4, s
    assert open(os.path.join(app.gates, "preflight.calls")).read().split() == ["planned"]  # one preflight
    with open(os.path.join(run_dir, "config.json")) as f:
        resumed = json.load(f)
    assert {**resumed, "resume_from_checkpoint": None} == saved  # the resumed run trained with the plan
    starts = [e for e in read_events(os.path.join(run_dir, "events.jsonl")) if e["type"] == "started"]
    assert len(starts) == 2 and starts[1]["start_step"] == 3
    assert not any(n.startswith("auto-fit") for n in starts[1]["notes"]), starts[1]["notes"]
