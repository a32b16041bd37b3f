"""The job queue survives ``kill -9`` (issue 11 point 5), against a real ``python app.py`` on one root.

Four sessions submit a run each; the first is held at its checkpoint of step 2 (a named gate of
tests/fixtures/app_hooks.py) and the server is killed with one job training and three queued. After the restart
the trainer's job is interrupted (Resume) and the others keep their places; the second one's preflight starts and
is held at its gate, and the server is killed again. After the second restart every session sees its run with
the right state and message: two interrupted (one with a checkpoint, one killed in its preflight), two in line;
the two in line run in order, and both interrupted ones resume (from step 2, and from the start).
"""
from __future__ import annotations

import os
import signal
import time

import pytest
from gradio_client import Client, handle_file

from app_fixtures import call, make_images, start_app, stop_app, wait_for
from test_frozen_dataset import wait_file
from trainer.events import read_events

RUN = dict(concept="face", trigger="TOK", base_model="tiny-sdxl", max_train_steps=4, checkpointing_steps=2,
           seed=3, rank=4, auto_fit=False, validation_prompt="", train_text_encoder_ti=False)


def kill9(server) -> None:
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=30)


def clients_of(server, sessions: dict[str, str]) -> dict[str, Client]:
    """Clients of ``server`` that speak as the given sessions (as a reloaded page of each would)."""
    out = {}
    for name, sid in sessions.items():
        c = Client(server.url, verbose=False)
        c.session_hash = sid
        out[name] = c
    return out


def brief(c) -> dict:
    return c.predict(api_name="/training_status")


def test_kill9_with_jobs_training_preflighting_and_queued_then_restart(tmp_path):
    gates = tmp_path / "gates"
    gates.mkdir()
    env = {"TEST_GATES": str(gates), "TEST_FAKE_PLAN": str(gates)}
    arm = lambda point: open(gates / f"{point}.wait", "w").close()  # noqa: E731
    imgs = make_images(str(tmp_path / "imgs"), 3)
    server = start_app(str(tmp_path), step_delay=0, env=env, timeout=300)
    try:
        cs = {n: Client(server.url, verbose=False) for n in "abcd"}
        for c in cs.values():
            c.predict([handle_file(p) for p in imgs], api_name="/upload_images")
        arm("a.checkpoint-2")
        for n, c in cs.items():  # b asks for the preflight (auto_fit), the others do not
            out = call(c, "/start_training", run_name=n, **{**RUN, "auto_fit": n == "b"})
            assert "submitted" in out[0], out[0]
        wait_file(str(gates / "a.checkpoint-2.reached"))
        assert [brief(cs[n])["position"] for n in "bcd"] == [2, 3, 4]
        arm("b.preflight")
        kill9(server)  # a training (checkpoint 2 on disk), b, c, d queued

        sessions = {n: c.session_hash for n, c in cs.items()}
        server = start_app(str(tmp_path), step_delay=0, env=env, timeout=300)
        cs = clients_of(server, sessions)
        wait_file(str(gates / "b.preflight.reached"))  # b went first in line, into its preflight
        s = {n: brief(c) for n, c in cs.items()}
        assert s["a"]["state"] == "interrupted" and "checkpoint at step 2" in s["a"]["notice"], s["a"]
        assert s["b"]["state"] == "running" and s["b"]["run"] == "b", s["b"]
        assert (s["c"]["state"], s["c"]["position"], s["d"]["state"], s["d"]["position"]) == \
            ("queued", 2, "queued", 3), (s["c"], s["d"])
        assert "kept its place" in s["c"]["notice"]
        kill9(server)  # b in its preflight, c and d queued, a interrupted

        os.remove(gates / "a.checkpoint-2.wait")
        os.remove(gates / "b.preflight.wait")
        server = start_app(str(tmp_path), step_delay=0, env=env, timeout=300)
        cs = clients_of(server, sessions)
        s = {n: brief(c) for n, c in cs.items()}
        assert s["a"]["state"] == "interrupted" and "step 2" in s["a"]["notice"], s["a"]
        assert s["b"]["state"] == "interrupted" and "preflight" in s["b"]["notice"], s["b"]
        assert s["c"]["state"] in ("running", "finished") and s["d"]["state"] in ("queued", "running"), s
        out = cs["a"].predict(api_name="/resume_training")
        assert "Resuming" in out[0], out[0]
        out = cs["b"].predict(api_name="/resume_training")
        assert "starts again" in out[0], out[0]
        for n in "cdab":
            st = wait_for(cs[n], lambda x: x["state"] in ("finished", "failed"), timeout=180, what=f"run {n}")
            assert st["state"] == "finished" and st["step"] == 4, (n, st)
    finally:
        stop_app(server)

    runs = {n: os.path.join(server.root, "sessions", sid, "runs", n) for n, sid in sessions.items()}
    ends = {n: [e for e in read_events(os.path.join(d, "events.jsonl")) if e["type"] == "finished"][-1]["time"]
            for n, d in runs.items()}
    assert sorted(ends, key=ends.get) == ["c", "d", "a", "b"]  # the line's order, then the two resumes
    starts = [e for e in read_events(os.path.join(runs["a"], "events.jsonl")) if e["type"] == "started"]
    assert [e["start_step"] for e in starts] == [0, 2]  # a continued from its checkpoint
    # b's preflight ran when the first restart put it first in line, and again when its Resume restarted it
    assert open(gates / "preflight.calls").read().split() == ["b", "b"]


def test_a_new_manager_on_the_store_requeues_in_order_and_interrupts_the_running_one(tmp_path):
    """The same, in process and in a second: the store a killed manager left behind, read by a new one."""
    import threading

    from trainer import TrainConfig
    from ui.jobs import JobManager

    hold = threading.Event()
    store = str(tmp_path / "queue.json")
    first = JobManager(train_fn=lambda cfg, on_event=None, stop=None: hold.wait(30), store=store)
    jobs = [first.submit(f"s{i}", TrainConfig(output_dir=str(tmp_path / f"r{i}"))) for i in range(3)]
    end = time.time() + 60
    while jobs[0].state != "running" and time.time() < end:
        time.sleep(0.01)
    assert jobs[0].state == "running"
    # "restart": a second manager on the same store, its worker not started, while the first is still alive
    second = JobManager(store=store, start=False)
    got = [second.latest(f"s{i}") for i in range(3)]
    assert [j.state for j in got] == ["interrupted", "queued", "queued"]
    assert [second.position(j) for j in got[1:]] == [1, 2]
    assert "preflight" in got[0].snapshot()[-1]["message"]  # no events.jsonl: it was still preparing
    with pytest.raises(RuntimeError, match="stop it first"):
        second.submit("s1", TrainConfig(output_dir=str(tmp_path / "other")))  # one active run per session
    hold.set()
