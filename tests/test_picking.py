"""The picker (trainer/picking) and the validation loss, on the offline tiny SDXL model and tiny-clip.

One tiny-sdxl run (4 steps, checkpoints at 2 and 4, one image held out for the validation loss, ``--pick_best``
with scales 0.8 and 1.2 and one seed at 64 px / 2 steps) is trained once per module; the rule is checked on
constructed scores, where the answer is known.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import write_dataset
from trainer.config import ConfigError, TrainConfig
from trainer.events import read_events
from trainer.picking import PickError, SweepSettings, load_pick, run_sweep
from trainer.picking.grid import LABEL_H, LABEL_W, PAD, THUMB
from trainer.picking.rule import FIT_FRACTION, RULE_TEXT, Cell, decide, floor_of
from trainer.picking.scorer import prompt_without_trigger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELD = ("TOK on a beach", "a painting of TOK")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 64 px tiny models: one thread is fastest on a busy 2-core box
    torch.set_flush_denormal(True)
    yield
    torch.set_num_threads(n)


def _cfg(data, out, **kw) -> TrainConfig:
    values = dict(pretrained_model_name_or_path="tiny-sdxl", instance_data_dir=data, output_dir=out,
                  max_train_steps=4, learning_rate=1e-3, resolution=64, checkpointing_steps=2,
                  train_text_encoder_ti=True, validation_loss_images=1, validation_loss_every=2,
                  validation_inference_steps=2)
    values.update(kw)
    return TrainConfig.from_sources(**values)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("pick") / "data")
    write_dataset(folder, sizes=((64, 64),) * 4, captions=["a photo of TOK dog"] * 4)
    return folder


@pytest.fixture(scope="module")
def run(data, tmp_path_factory, tiny_sdxl):
    """(result, events seen by on_event) of the --pick_best run."""
    from trainer import train

    seen = []
    out = str(tmp_path_factory.mktemp("pick") / "run")
    result = train(_cfg(data, out, pick_best=True, pick_scales="0.8,1.2", pick_seeds=1), on_event=seen.append)
    return result, seen


# ----- the rule, on constructed scores ---------------------------------------------------------------------------
def _cell(name, scale, likeness, beach, painting):
    return Cell(checkpoint=name, step=int(name.split("-")[1]), scale=scale, likeness=likeness,
                fit_by_prompt={HELD[0]: beach, HELD[1]: painting})


BASE = {HELD[0]: 0.30, HELD[1]: 0.28}


def test_the_most_alike_setting_is_not_picked_when_its_prompt_fit_collapsed():
    cells = [_cell("step-100", 0.8, 0.70, 0.29, 0.27),
             _cell("step-200", 1.0, 0.80, 0.28, 0.26),
             _cell("step-200", 1.2, 0.95, 0.29, 0.12)]     # most alike, but "a painting of" is gone
    best, why = decide(cells, BASE)
    assert (best.checkpoint, best.scale) == ("step-200", 1.0)
    assert not cells[2].keeps_prompt and cells[0].keeps_prompt and cells[1].keeps_prompt
    assert "step-200 at scale 1.2 looks more like the images" in why and "a painting of TOK" in why
    assert "85%" in RULE_TEXT and FIT_FRACTION == 0.85


def test_one_collapsed_prompt_is_enough_and_the_floor_is_85_percent_of_the_base():
    assert floor_of(0.30) == pytest.approx(0.255)
    assert floor_of(-0.20) == pytest.approx(-0.23)  # negative cosines (random-weight CLIP): the floor is lower
    just_above = _cell("step-1", 1.0, 0.9, 0.256, 0.28)
    just_below = _cell("step-2", 1.0, 0.99, 0.254, 0.40)  # a great fit on one prompt does not buy the other
    best, _ = decide([just_above, just_below], BASE)
    assert best is just_above and not just_below.keeps_prompt


def test_when_every_setting_collapsed_the_least_collapsed_is_named_so():
    cells = [_cell("step-100", 0.6, 0.6, 0.20, 0.20), _cell("step-200", 1.2, 0.9, 0.10, 0.05)]
    best, why = decide(cells, BASE)
    assert best is cells[0] and why.startswith("no setting keeps every held-out prompt")


def test_ties_go_to_the_better_fit_then_the_lower_scale():
    a, b = _cell("step-1", 1.2, 0.8, 0.30, 0.28), _cell("step-1", 0.8, 0.8, 0.30, 0.28)
    assert decide([a, b], BASE)[0] is b
    c = _cell("step-1", 1.2, 0.8, 0.35, 0.30)
    assert decide([a, b, c], BASE)[0] is c


def test_the_rule_refuses_what_it_cannot_judge():
    with pytest.raises(ValueError, match="no cells"):
        decide([], BASE)
    with pytest.raises(ValueError, match="no prompt fit"):
        decide([Cell("step-1", 1, 1.0, 0.5, {HELD[0]: 0.3})], BASE)


def test_prompt_fit_text_drops_the_trigger_by_the_one_placeholder_rule():
    assert prompt_without_trigger("a painting of TOK", "TOK") == "a painting of"
    assert prompt_without_trigger("TOK on a beach", "TOK") == "on a beach"
    assert prompt_without_trigger("TOKYO at night, TOK", "TOK") == "TOKYO at night"
    assert prompt_without_trigger("a photo of SKS and TOK", "TOK, SKS") == "a photo of and"


def test_pick_options_are_validated(tmp_path):
    data = str(tmp_path)  # not the checkout: its outputs/ would be inside the data folder (refused)
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"pick_scales": "0.8,abc", "instance_data_dir": data}).validate()
    assert "pick_scales" in e.value.fields
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"pick_scales": "0.8,2.5", "pick_seeds": 0, "instance_data_dir": data}).validate()
    assert {"pick_scales", "pick_seeds"} <= set(e.value.fields)
    from trainer.cli import parse_config

    cfg, _ = parse_config(["--instance_data_dir", data, "--pick_best", "--validation_loss_images", "2"])
    assert cfg.pick_best is True and cfg.validation_loss_images == 2
    assert cfg.pick_scale_values == (0.6, 0.8, 1.0, 1.2)


# ----- the sweep on a real (tiny) run ------------------------------------------------------------------------------
def test_pick_best_sweeps_every_kept_checkpoint_and_scale(run):
    result, seen = run
    rec = json.load(open(result.artifacts["pick"]))
    assert [(c["step"], c["scale"]) for c in rec["cells"]] == [(2, 0.8), (2, 1.2), (4, 0.8), (4, 1.2)]
    assert rec["settings"]["prompts"] == ["a photo of TOK", *HELD] and rec["settings"]["clip_model"] == "tiny-clip"
    for c in rec["cells"]:
        assert len(c["images"]) == 3 and set(c["fit_by_prompt"]) == set(HELD)
        assert all(os.path.isfile(os.path.join(result.run_dir, "pick", "images", n)) for n in c["images"])
        assert -1.0 <= c["likeness"] <= 1.0
    kept = [c for c in rec["cells"] if c["keeps_prompt"]]
    best = max(kept, key=lambda c: c["likeness"]) if kept else None
    assert best is not None and (rec["pick"]["step"], rec["pick"]["scale"]) == (best["step"], best["scale"])
    assert rec["rule_text"] == RULE_TEXT and rec["pick"]["checkpoint"] in rec["why"]
    picked = [e for e in seen if e.type == "picked"]
    assert len(picked) == 1 and picked[0].why == rec["why"]
    assert [e for e in read_events(os.path.join(result.run_dir, "events.jsonl")) if e["type"] == "picked"]
    grid = Image.open(os.path.join(result.run_dir, rec["grid"]))
    assert grid.size == (LABEL_W + 2 * (3 * THUMB + 2 * PAD), LABEL_H + 2 * (THUMB + 2 * PAD))
    # the pick's cell has the green frame, the others none
    for c in rec["cells"]:
        row, col = [2, 4].index(c["step"]), [0.8, 1.2].index(c["scale"])
        px = grid.getpixel((LABEL_W + col * (3 * THUMB + 2 * PAD) + 2, LABEL_H + row * (THUMB + 2 * PAD) + 2))
        assert (px == (20, 170, 60)) == ((c["step"], c["scale"]) == (rec["pick"]["step"], rec["pick"]["scale"]))


def test_each_checkpoint_is_exported_as_loadable_files(run):
    result, _ = run
    final = load_file(result.artifacts["diffusers"])
    step4 = load_file(os.path.join(result.run_dir, "pick", "step-4", "pytorch_lora_weights.safetensors"))
    step2 = load_file(os.path.join(result.run_dir, "pick", "step-2", "pytorch_lora_weights.safetensors"))
    assert final.keys() == step4.keys() == step2.keys()
    assert all(torch.equal(final[k], step4[k]) for k in final)  # the last checkpoint is the final LoRA
    assert any(not torch.equal(step2[k], step4[k]) for k in final)
    emb = load_file(os.path.join(result.run_dir, "pick", "step-4", "run_emb.safetensors"))
    assert set(emb) == {"clip_l", "clip_g"}


def test_load_pick_reads_it_back_and_the_engine_uses_it(run, tmp_path):
    from generation import Engine, GenerateRequest

    result, _ = run
    pick = load_pick(result.run_dir)
    rec = json.load(open(result.artifacts["pick"]))
    assert (pick.checkpoint, pick.step, pick.scale) == (rec["pick"]["checkpoint"], rec["pick"]["step"],
                                                         rec["pick"]["scale"])
    assert os.path.isfile(pick.lora_path) and os.path.isfile(pick.embeddings_path) and os.path.isfile(pick.grid_path)
    assert pick.why == rec["why"] and pick.record["cells"] == rec["cells"]
    eng = Engine()
    try:
        common = dict(base_model="tiny-sdxl", prompt="a painting of TOK", steps=2, width=64, height=64, seed=0,
                      lora_path=pick.lora_path, embeddings_path=pick.embeddings_path)
        img = np.asarray(eng.generate(GenerateRequest(lora_scale=pick.scale, **common)).images[0])
        name = f"step-{pick.step}_scale-{pick.scale:g}_p2_seed-0.png"
        # the sweep's image of this cell came from the same engine path: identical pixels
        assert np.array_equal(img, np.asarray(Image.open(os.path.join(result.run_dir, "pick", "images", name))))
    finally:
        eng.release()
    assert load_pick(str(tmp_path)) is None
    os.makedirs(tmp_path / "run", exist_ok=True)
    (tmp_path / "run" / "pick.json").write_text("{not json")
    with pytest.raises(PickError, match="damaged"):
        load_pick(str(tmp_path / "run"))
    (tmp_path / "run" / "pick.json").write_text(open(result.artifacts["pick"]).read())
    with pytest.raises(PickError, match="is gone"):
        load_pick(str(tmp_path / "run"))


def test_pick_command_end_to_end(run):
    result, _ = run
    before = json.load(open(result.artifacts["pick"]))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "trainer", "pick", result.run_dir, "--scales", "0.8,1.2", "--seeds", "1",
           "--clip_model", "tiny-clip"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "pick sweep" in p.stderr and "100%" in p.stderr  # the progress bar
    after = json.load(open(result.artifacts["pick"]))
    assert f"pick: {after['pick']['checkpoint']} at LoRA scale {after['pick']['scale']:g}" in p.stderr
    assert "rule: " + RULE_TEXT in p.stdout
    # fixed seeds: the same sweep scores the same (another process, the same numbers)
    for a, b in zip(before["cells"], after["cells"]):
        assert a["likeness"] == pytest.approx(b["likeness"], abs=1e-5)
        assert a["fit_by_prompt"] == pytest.approx(b["fit_by_prompt"], abs=1e-5)
    bad = subprocess.run(cmd[:5] + ["--scales", "0.8,9"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "--pick_scales '0.8,9'" in bad.stderr
    gone = subprocess.run(cmd[:4] + [result.run_dir + "-nope"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert gone.returncode == 2 and "does not exist" in gone.stderr


def test_a_run_without_checkpoints_is_refused_clearly(run, tmp_path):
    result, _ = run
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "config.json").write_text(open(os.path.join(result.run_dir, "config.json")).read())
    with pytest.raises(PickError, match="no complete checkpoint"):
        run_sweep(str(folder), SweepSettings(scales=(1.0,), seeds=(0,)))
    with pytest.raises(PickError, match="no config.json"):
        run_sweep(str(tmp_path))


# ----- the validation loss --------------------------------------------------------------------------------------
def _val_losses(events) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in events if e["type"] == "validation_loss"]


def _step_losses(events) -> list[float]:
    return [e["loss"] for e in events if e["type"] == "step"]


def test_validation_loss_events_are_fixed_and_do_not_disturb_training(run, data, tmp_path):
    from trainer import train

    result, _ = run
    first = read_events(os.path.join(result.run_dir, "events.jsonl"))
    val = _val_losses(first)
    assert [s for s, _ in val] == [0, 2, 4]  # the start, every 2 steps, the end
    assert len({v for _, v in val}) == 3       # the weights moved, so the held-out loss did
    started = next(e for e in first if e["type"] == "started")
    assert started["num_images"] == 3 and any("img3.png" in n for n in started["notes"])
    # an identical run (without the sweep) gives the identical curve: fixed noise and timesteps
    again = train(_cfg(data, str(tmp_path / "again")))
    ev_again = read_events(os.path.join(again.run_dir, "events.jsonl"))
    assert _val_losses(ev_again) == val
    assert _step_losses(ev_again) == _step_losses(first)
    # measuring every step instead changes nothing in the training itself
    every = train(_cfg(data, str(tmp_path / "every"), validation_loss_every=1))
    ev_every = read_events(os.path.join(every.run_dir, "events.jsonl"))
    assert [s for s, _ in _val_losses(ev_every)] == [0, 1, 2, 3, 4]
    assert _step_losses(ev_every) == _step_losses(first)
    assert dict(_val_losses(ev_every))[2] == dict(val)[2]


def test_holding_out_every_image_is_refused(data, tmp_path):
    from trainer import TrainingError, train

    with pytest.raises(TrainingError, match="holds out every image"):
        train(_cfg(data, str(tmp_path / "all"), validation_loss_images=4))


# ----- the app: the grid with the pick, Generate on the pick ---------------------------------------------------------
def _step2_picked_copy(run_dir: str, dst: str) -> dict:
    """The run with its pick moved to step-2 x 0.8 (so the pick differs from the final LoRA)."""
    import shutil

    shutil.copytree(run_dir, dst)
    path = os.path.join(dst, "pick.json")
    rec = json.load(open(path))
    rec["pick"] = next(c for c in rec["cells"] if (c["step"], c["scale"]) == (2, 0.8))
    json.dump(rec, open(path, "w"))
    return rec


def test_the_app_shows_the_grid_and_generates_with_the_pick(run, tmp_path):
    from gradio_client import Client

    from app_fixtures import call, free_port
    from ui import build_app
    from ui.pick_view import pick_summary
    from ui.train_tab import loss_frame, summarize

    result, _ = run
    demo, kw = build_app(root=str(tmp_path / "outputs"))
    demo.launch(prevent_thread_lock=True, server_port=free_port(), **kw)
    try:
        client = Client(f"http://127.0.0.1:{demo.server_port}", verbose=False)
        ctx = demo.ls_context
        runs = ctx.workspaces.runs_dir(client.session_hash)
        rec = _step2_picked_copy(result.run_dir, os.path.join(runs, "picked"))
        client.predict(api_name="/list_runs")  # the run list of this session (as the tab's refresh does)
        md, grid, table, scale = client.predict(run_name="picked", api_name="/show_pick")[:4]
        assert "Pick: step-2 at LoRA scale 0.8" in md and rec["why"] in md and RULE_TEXT in md
        assert Image.open(grid).size == Image.open(os.path.join(runs, "picked", "pick", "grid.png")).size
        rows = table["data"] if isinstance(table, dict) else table
        assert [r[-1] for r in rows] == ["★", "", "", ""] and len(rows) == 4
        assert scale == 0.8  # the Generate tab's LoRA scale defaults to the pick's
        common = dict(run="picked", prompt="a painting of TOK", negative_prompt="", scheduler="Euler a", steps=2,
                      guidance_scale=5.0, lora_scale=0.8, width=64, height=64, seed=0, num_images=1)
        engine = ctx.engine.get()
        picked_dir = os.path.join(runs, "picked")
        assert len(call(client, "/generate", **common)[0]) == 1
        # the shared engine now holds the picked checkpoint's files (the gallery's webp copies are lossy, so the
        # files are checked, not the pixels)
        assert engine._lora[0] == os.path.join(picked_dir, "pick", "step-2", "pytorch_lora_weights.safetensors")
        assert engine._emb[0][0] == os.path.join(picked_dir, "pick", "step-2", "run_emb.safetensors")
        assert len(call(client, "/generate", use_pick=False, **common)[0]) == 1
        assert engine._lora[0] == os.path.join(picked_dir, "pytorch_lora_weights.safetensors")
        # a finished run without a sweep: the button runs it on the app's engine
        import shutil

        shutil.copytree(result.run_dir, os.path.join(runs, "fresh"), ignore=shutil.ignore_patterns("pick*"))
        client.predict(api_name="/list_runs")
        assert "No sweep yet" in client.predict(run_name="fresh", api_name="/show_pick")[0]
        md = client.predict(run_name="fresh", api_name="/find_best")[0]
        assert "Pick: step-" in md and load_pick(os.path.join(runs, "fresh")) is not None
    finally:
        demo.close()
    assert pick_summary(str(tmp_path))["can_sweep"] and "No sweep yet" in pick_summary(str(tmp_path))["md"]
    # the Train tab's loss plot carries the validation loss next to the training loss
    events = read_events(os.path.join(result.run_dir, "events.jsonl"))
    s = summarize({"state": "finished", "run": "r", "events": events, "position": 0})
    df = loss_frame(s)
    assert set(df["series"]) == {"training", "smoothed", "validation"} and len(df[df.series == "validation"]) == 3
