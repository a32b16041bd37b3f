"""Smaller user paths that went wrong: --preset against a config file's preset, models that would train wrongly
(SDXL refiner, Playground-style EDM scheduler or normalised VAE), the seed of a run without --seed, a reused
--output_dir, the run folder as the data folder, and a dataset left too small by skipped files."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_dataset
from trainer import TrainConfig, read_events, train
from trainer.cli import main, parse_config
from trainer.config import ConfigError, load_preset
from trainer.config.run_folder import output_dir_problem
from trainer.families.unsupported import unsupported_reason
from trainer.training.errors import TrainingError

BASE = dict(pretrained_model_name_or_path="tiny-sdxl", max_train_steps=4, rank=4, seed=1)


def test_cli_preset_wins_over_the_config_files_preset(tmp_path):
    face, style = load_preset("face"), load_preset("style")
    differ = [k for k in face if k in style and face[k] != style[k] and k != "rank"]
    assert differ
    (tmp_path / "run.yaml").write_text("preset: style\nrank: 8\n")
    cfg, _ = parse_config(["--preset", "face", "--config", str(tmp_path / "run.yaml"),
                           "--instance_data_dir", str(tmp_path)])
    assert cfg.preset == "face" and cfg.rank == 8  # the file's own values still win over the preset
    assert all(getattr(cfg, k) == TrainConfig.from_dict({k: face[k]}).__dict__[k] for k in differ)
    cfg, _ = parse_config(["--config", str(tmp_path / "run.yaml"), "--instance_data_dir", str(tmp_path)])
    assert cfg.preset == "style"  # without --preset the file's preset applies


def _variant(tmp_path, tiny_sdxl, name, index=None, scheduler=None, vae=None) -> str:
    """A copy of tiny-sdxl (parts linked) with its model_index / scheduler / VAE config changed."""
    folder = tmp_path / name
    folder.mkdir()
    for part in os.listdir(tiny_sdxl):
        src = os.path.join(tiny_sdxl, part)
        if part in ("scheduler", "vae"):
            shutil.copytree(src, folder / part)
        elif part != "model_index.json":
            os.symlink(src, folder / part)
    idx = json.load(open(os.path.join(tiny_sdxl, "model_index.json")))
    idx.update(index or {})
    (folder / "model_index.json").write_text(json.dumps(idx))
    for part, file, changes in (("scheduler", "scheduler_config.json", scheduler), ("vae", "config.json", vae)):
        if changes:
            path = folder / part / file
            path.write_text(json.dumps({**json.load(open(path)), **changes}))
    return str(folder)


def test_sdxl_refiner_is_refused_by_name(tmp_path, dataset, tiny_sdxl):
    refiner = _variant(tmp_path, tiny_sdxl, "refiner", index={
        "_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None], "tokenizer": [None, None],
        "requires_aesthetics_score": True})
    with pytest.raises(TrainingError, match="SDXL refiner.*stable-diffusion-xl-base-1.0"):
        train(TrainConfig.from_sources(**{**BASE, "pretrained_model_name_or_path": refiner,
                                          "instance_data_dir": dataset, "output_dir": str(tmp_path / "r")}))
    assert unsupported_reason(tiny_sdxl) is None


def test_playground_style_models_are_refused(tmp_path, dataset, tiny_sdxl):
    edm = _variant(tmp_path, tiny_sdxl, "edm", scheduler={"_class_name": "EDMDPMSolverMultistepScheduler"})
    assert "EDM noise schedule" in unsupported_reason(edm)
    normalised = _variant(tmp_path, tiny_sdxl, "pg", vae={"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4})
    assert "latents_mean/latents_std" in unsupported_reason(normalised)
    with pytest.raises(TrainingError, match="latents_mean/latents_std"):
        train(TrainConfig.from_sources(**{**BASE, "pretrained_model_name_or_path": normalised,
                                          "instance_data_dir": dataset, "output_dir": str(tmp_path / "r")}))
    # a separate VAE is checked instead of the model's own
    assert "latents_mean" in unsupported_reason(tiny_sdxl, vae_path=os.path.join(normalised, "vae"))


def test_no_seed_is_chosen_saved_and_reused_on_resume(tmp_path, dataset, tiny_sdxl):
    out = str(tmp_path / "r")
    cfg = TrainConfig.from_sources(**{**BASE, "seed": None, "instance_data_dir": dataset, "output_dir": out,
                                      "checkpointing_steps": 2})
    train(cfg)
    seed = json.load(open(os.path.join(out, "config.json")))["seed"]
    assert isinstance(seed, int)
    notes = [n for e in read_events(os.path.join(out, "events.jsonl")) for n in e.get("notes", [])]
    assert any(f"uses seed {seed}" in n for n in notes)
    whole = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    # resuming at step 2 without --seed takes the saved seed: the same batches and noise, the same weights
    res = train(cfg.replace(resume_from_checkpoint=os.path.join(out, "checkpoints", "step-2")))
    assert res.step == 4 and json.load(open(os.path.join(out, "config.json")))["seed"] == seed
    resumed = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_cli_refuses_another_runs_output_dir(tmp_path, dataset, capsys):
    out = tmp_path / "old-run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    rc = main(["--pretrained_model_name_or_path", "tiny-sdxl", "--instance_data_dir", dataset,
               "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "already holds another run" in err and "--resume_from_checkpoint latest" in err
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == b"x"
    cfg = TrainConfig.from_sources(**{**BASE, "instance_data_dir": dataset, "output_dir": str(out)})
    assert output_dir_problem(cfg.replace(resume_from_checkpoint="latest")) is None  # resuming is the way in
    assert output_dir_problem(cfg.replace(output_dir=str(tmp_path / "new"))) is None


@pytest.mark.parametrize("inside", ["", "run"])
def test_run_folder_cannot_be_the_data_folder(dataset, inside):
    with pytest.raises(ConfigError, match="output_dir.*data folder"):
        TrainConfig.from_sources(**{**BASE, "instance_data_dir": dataset,
                                    "output_dir": os.path.join(dataset, inside)})


def test_too_small_dataset_names_each_skipped_file(tmp_path, tiny_sdxl):
    data = str(tmp_path / "data")
    write_dataset(data, sizes=((96, 64), (64, 96)))
    with open(os.path.join(data, "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really")
    with open(os.path.join(data, "phone.heic"), "wb") as f:
        f.write(b"\0" * 64)
    with pytest.raises(TrainingError) as err:
        train(TrainConfig.from_sources(**{**BASE, "instance_data_dir": data, "output_dir": str(tmp_path / "r")}))
    text = str(err.value)
    assert "2 usable images" in text and "skipped while reading" in text
    assert "broken.png" in text and "phone.heic" in text and "not supported" in text


def test_clip_skip_is_accepted_with_its_note(tmp_path):
    """--clip_skip (a flag of diffusers' scripts) no longer stops the command line; the note says what is used."""
    cfg, notes = parse_config(["--instance_data_dir", str(tmp_path), "--clip_skip", "2"])
    assert any("--clip_skip is accepted" in n and "penultimate layer" in n for n in notes)
