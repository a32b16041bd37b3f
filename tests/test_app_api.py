"""The app driven through its API with gradio_client, against a real ``python app.py`` (offline, tiny models)."""
from __future__ import annotations

import os
import time
import urllib.error
import urllib.request

import pytest
from gradio_client import Client, handle_file

from app_fixtures import app_server, call, images, make_images, status, wait_for  # noqa: F401  (fixtures)
from trainer.config import TrainConfig, coerce_field, load_preset


def client_for(server) -> Client:
    return Client(server.url, verbose=False)



def upload(client, paths):
    return client.predict([handle_file(p) for p in paths], api_name="/upload_images")


def table_rows(table) -> list[list]:
    return table["data"] if isinstance(table, dict) else table


def test_full_flow_upload_caption_train_stop_resume_generate(app_server, images, tmp_path):
    c = client_for(app_server)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    _, gallery, table, msg, problems = upload(c, images + [str(bad)])
    assert len(gallery) == 4 and len(table_rows(table)) == 4
    assert "broken.png" in msg and "4" in msg  # per-file message, good files kept
    assert any("broken.png" in r[0] for r in table_rows(problems))

    table, note = c.predict(model="tiny-blip", concept="face", trigger="TOK", overwrite=True,
                            api_name="/auto_caption")
    caps = [r[1] for r in table_rows(table)]
    assert len(caps) == 4 and all(cap.startswith("a photo of TOK") for cap in caps), caps
    meta = os.path.join(app_server.root, "sessions", c.session_hash, "uploads", "metadata.jsonl")
    assert os.path.isfile(meta) and open(meta).read().count("TOK") == 4

    problems, hist, check_msg = c.predict(base_model="tiny-sdxl", trigger="TOK", api_name="/check_dataset")
    assert "4 images" in check_msg and "64x64" in hist

    t0 = time.time()
    out = call(c, "/start_training", run_name="api run", concept="face", trigger="TOK", base_model="tiny-sdxl", max_train_steps=40,
                    checkpointing_steps=5, validation_steps=20, num_validation_images=1,
                    validation_inference_steps=4)
    assert "submitted" in out[0], out[0]
    seen_steps = []

    def progressed(s):
        if s.get("step"):
            seen_steps.append(s["step"])
        return s.get("step", 0) >= 8

    wait_for(c, progressed, what="steps")
    assert seen_steps == sorted(seen_steps) and seen_steps[-1] > seen_steps[0] or len(seen_steps) == 1
    c.predict(api_name="/stop_training")
    s = wait_for(c, lambda s: s["state"] == "stopped", what="stop")
    stopped_at = s["step"]
    assert 8 <= stopped_at < 40
    runs_dir = os.path.join(app_server.root, "sessions", c.session_hash, "runs", "api-run")
    assert os.path.isdir(os.path.join(runs_dir, "checkpoints"))
    from trainer.events import read_events

    started = [e for e in read_events(os.path.join(runs_dir, "events.jsonl")) if e["type"] == "started"][0]
    assert any(n.startswith("auto-fit: Fits") for n in started["notes"]), started["notes"]  # the app's preflight

    out = c.predict(api_name="/resume_training")
    assert "Resuming" in out[0], out[0]
    s = wait_for(c, lambda s: s["state"] in ("finished", "failed"), what="finish")
    assert s["state"] == "finished", s
    assert s["step"] == 40 and s["num_losses"] >= 40 and s["num_samples"] >= 1
    print(f"train+stop+resume: {time.time() - t0:.1f}s")

    run_dd = c.predict(api_name="/list_runs")
    assert run_dd is not None
    gallery, seed_md = call(c, "/generate", run="api-run", prompt="a photo of TOK", negative_prompt="", scheduler="Euler a",
                                 steps=4, guidance_scale=5.0, lora_scale=1.0, width=None, height=None, seed=123,
                                 num_images=2)
    assert len(gallery) == 2 and all(os.path.isfile(g["image"]) for g in gallery)
    assert "123" in seed_md

    # Publishing without a network fails with a clear message that never echoes the token.
    res = c.predict(run="api-run", token="hf_secret_value_123", repo="me/x", private=True, api_name="/push_to_hub")
    assert "hf_secret_value_123" not in res and "Error" in res and "Hub" in res, res


def plain(v):
    """A field's value as the API returns it: the short form's fields come back as updates (value + preset hint)."""
    return v.get("value") if isinstance(v, dict) and v.get("__type__") == "update" else v


def test_concept_change_applies_preset_and_keeps_hand_edits(app_server):
    c = client_for(app_server)
    names = [p["parameter_name"] for p in c.view_api(print_info=False, return_format="dict")["named_endpoints"][
        "/set_concept"]["parameters"]][1:]
    out = call(c, "/set_concept", concept="style", rank=7)
    values, msg = {n: plain(v) for n, v in zip(names, out[:len(names)])}, out[-1]
    style = TrainConfig.from_dict(load_preset("style"))
    for k in load_preset("style"):
        if k in values and k != "rank":
            exp = getattr(style, k)
            got = coerce_field(k, values[k])
            assert got == exp, (k, got, exp)
    assert values["rank"] == 7 and "rank" in msg
    # Back to face: rank is still the user's value, every other field follows the preset.
    out = call(c, "/set_concept", concept="object", **values)
    values2 = {n: plain(v) for n, v in zip(names, out[:len(names)])}
    obj = TrainConfig.from_dict(load_preset("object"))
    assert values2["rank"] == 7
    assert coerce_field("max_train_steps", values2["max_train_steps"]) == obj.max_train_steps
    assert coerce_field("steps_per_image", values2["steps_per_image"]) == obj.steps_per_image


def test_bad_settings_are_reported_per_field(app_server, images):
    c = client_for(app_server)
    upload(c, images)
    out = call(c, "/start_training", run_name="bad", concept="face", trigger="TOK", base_model="tiny-sdxl",
               rank=0, learning_rate=-1.0)
    assert "`rank`" in out[0] and "`learning_rate`" in out[0] and ">" in out[0]
    assert status(c)["state"] == "none"


def test_sessions_are_isolated(app_server, images, tmp_path):
    a, b = client_for(app_server), client_for(app_server)
    assert a.session_hash != b.session_hash
    upload(a, images[:3])
    gal_b, table_b = b.predict(api_name="/list_dataset")
    assert not gal_b and not table_rows(table_b)
    assert b.predict(api_name="/training_status")["state"] in ("none",)
    own = os.path.join(app_server.root, "sessions", a.session_hash, "uploads", "photo_0.png")
    if not os.path.exists(own):
        own = os.path.join(app_server.root, "sessions", a.session_hash, "uploads",
                           sorted(os.listdir(os.path.dirname(own)))[0])
    assert os.path.isfile(own)
    for path in (own, own.replace(os.sep, "/")):
        req = urllib.request.Request(f"{app_server.url}/gradio_api/file={path}")
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(req, timeout=10)
        assert ei.value.code in (403, 404)
    res = b.predict(run="nope", token="hf_x", repo="me/x", private=True, api_name="/push_to_hub")
    assert "No run named" in res


def test_job_queue_is_fifo_one_at_a_time_and_cleaner_keeps_runs(tmp_path):
    import threading
    from types import SimpleNamespace

    from ui.jobs import JobManager
    from ui.sessions import Workspaces

    gate, started, running = threading.Event(), threading.Event(), []

    def fake_train(cfg, on_event=None, stop=None):
        running.append(cfg.output_dir)
        started.set()
        assert len(running) - len(done) == 1  # never two at once
        gate.wait(10)
        done.append(cfg.output_dir)
        return SimpleNamespace(stopped=stop.is_set())

    done: list = []
    released = []
    jm = JobManager(train_fn=fake_train, before_train=[lambda: released.append(1)])
    jobs = [jm.submit(f"s{i}", SimpleNamespace(output_dir=str(tmp_path / f"r{i}"))) for i in range(3)]
    assert started.wait(10)  # the first job is running (a condition, not a sleep)
    assert [jm.position(j) for j in jobs] == [0, 2, 3]
    jm.stop(jobs[2])  # a queued job leaves the queue at once
    assert jobs[2].state == "stopped"
    gate.set()
    assert jm.wait_idle(10)
    assert [j.state for j in jobs] == ["finished", "finished", "stopped"] and len(released) == 2

    ws = Workspaces(str(tmp_path / "root"), max_idle_s=60)
    up, runs = ws.uploads_dir("abcd1234"), ws.runs_dir("abcd1234")
    open(os.path.join(up, "x.png"), "w").close()
    os.makedirs(os.path.join(runs, "r1"))
    assert ws.clean(now=time.time() + 30) == []
    assert ws.clean(now=time.time() + 3600) == ["abcd1234"]
    assert not os.path.exists(up) and os.path.isdir(os.path.join(runs, "r1"))


def test_captioner_and_engine_are_released_before_training_starts(tmp_path):
    """The app's job manager runs these hooks before every training: the captioner leaves memory."""
    import captioning
    from captioning import caption
    from PIL import Image

    from ui import build_app

    caption([Image.new("RGB", (32, 32))], model="tiny-blip", batch_size=1)
    assert captioning.loaded_captioners()
    demo, _ = build_app(root=str(tmp_path / "root"), max_idle_s=3600)
    hooks = demo.ls_context.jobs.before_train
    assert hooks, "the app registers release hooks on its job manager"
    for hook in hooks:
        hook()
    assert captioning.loaded_captioners() == []


def test_saved_choices_survive_and_bad_ones_are_left_out(tmp_path):
    import gradio as gr

    from ui.choices import acceptable
    from ui.sessions import Workspaces

    ws = Workspaces(str(tmp_path / "root"))
    assert ws.load_choices("abcd1234") == {}  # no such session
    ws.session_dir("abcd1234")
    assert ws.load_choices("abcd1234") == {}  # nothing saved yet
    ws.save_choices("abcd1234", {"concept": "style", "max_train_steps": 40, "last_applied": {"rank": 16}})
    assert ws.load_choices("abcd1234") == {"concept": "style", "max_train_steps": 40, "last_applied": {"rank": 16}}
    ws.save_choices("abcd1234", {"bad": object()})  # not JSON: nothing written, the last good file stays
    assert ws.load_choices("abcd1234")["concept"] == "style"
    assert not [n for n in os.listdir(ws.session_dir("abcd1234")) if n.endswith(".tmp")]
    with open(os.path.join(ws.session_dir("abcd1234"), "choices.json"), "w") as f:
        f.write("{not json")
    assert ws.load_choices("abcd1234") == {}

    with gr.Blocks():
        concept = gr.Dropdown(["face", "style"], value="face")
        custom = gr.Dropdown(["a"], value="a", allow_custom_value=True)
        steps, flag, text, state = gr.Number(1, precision=0), gr.Checkbox(False), gr.Textbox(""), gr.State({})
    assert acceptable(concept, "style") and not acceptable(concept, "gone-preset")
    assert acceptable(custom, "my/model") and acceptable(steps, 40) and not acceptable(steps, "40")
    assert not acceptable(steps, True) and acceptable(flag, True) and not acceptable(flag, 1)
    assert acceptable(text, "x") and not acceptable(text, 3) and acceptable(state, {}) and not acceptable(state, [])
