"""Config validation and CLI parsing: every bad value fails fast, naming the field; booleans are real."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from trainer.cli import parse_config
from trainer.config import ConfigError, TrainConfig, load_preset, parse_bool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (overrides, field named in the error)
BAD = [
    ({"rank": 0}, "rank"),
    ({"rank": "sixteen"}, "rank"),
    ({"rank": 2.5}, "rank"),
    ({"learning_rate": -1}, "learning_rate"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"optimizer": "sgd"}, "optimizer"),
    ({"lr_scheduler": "exponential"}, "lr_scheduler"),
    ({"mixed_precision": "fp8"}, "mixed_precision"),
    ({"train_text_encoder_ti_frac": 0}, "train_text_encoder_ti_frac"),
    ({"train_text_encoder_ti_frac": 1.5}, "train_text_encoder_ti_frac"),
    ({"num_new_tokens_per_abstraction": 0}, "num_new_tokens_per_abstraction"),
    ({"resolution": 1001}, "resolution"),
    ({"resolution": 32}, "resolution"),
    ({"train_batch_size": 0}, "train_batch_size"),
    ({"gradient_accumulation_steps": -2}, "gradient_accumulation_steps"),
    ({"max_train_steps": 0}, "max_train_steps"),
    ({"repeats": 0}, "repeats"),
    ({"caption_dropout": 1.5}, "caption_dropout"),
    ({"random_flip": "maybe"}, "random_flip"),
    ({"train_text_encoder_ti": "yes please"}, "train_text_encoder_ti"),
    ({"snr_gamma": -5}, "snr_gamma"),
    ({"lora_dropout": 0.95}, "lora_dropout"),
    ({"with_prior_preservation": True}, "class_prompt"),
    ({"train_text_encoder": True, "train_text_encoder_ti": True}, "train_text_encoder"),
    ({"instance_data_dir": "/definitely/not/here"}, "instance_data_dir"),
    ({"push_to_hub": True}, "hub_model_id"),
    ({"resume_from_checkpoint": "/no/such/checkpoint"}, "resume_from_checkpoint"),
    ({"token_abstraction": "two words"}, "token_abstraction"),
    ({"lora_target_modules": " , "}, "lora_target_modules"),
    ({"image_interpolation_mode": "cubic"}, "image_interpolation_mode"),
    ({"report_to": "mlflow"}, "report_to"),
    ({"center_crop": False, "cache_latents": True}, "cache_latents"),
    ({"latent_cache_dir": __file__}, "latent_cache_dir"),
    ({"output_name": "../escape"}, "output_name"),
    ({"prodigy_d_coef": 0}, "prodigy_d_coef"),
    ({"not_an_option": 1}, "not_an_option"),
]


@pytest.mark.parametrize("overrides,field", BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_bad_value_fails_with_a_message_naming_the_field(tmp_path, overrides, field):
    values = {"instance_data_dir": str(tmp_path), **overrides}
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_sources(**values)
    assert field in err.value.fields
    text = str(err.value)
    assert f"--{field}" in text
    assert len(text.splitlines()) >= 2  # "invalid configuration:" + one line per bad field


def test_all_bad_fields_are_reported_together(tmp_path):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_sources(instance_data_dir=str(tmp_path), rank="x", learning_rate=-1, repeats=0)
    assert {"rank", "learning_rate", "repeats"} <= set(err.value.fields)


@pytest.mark.parametrize("text,value", [("true", True), ("False", False), ("0", False), ("1", True),
                                        ("yes", True), ("no", False), ("OFF", False)])
def test_booleans_parse_for_real(text, value):
    assert parse_bool(text) is value


def test_cli_booleans_and_presets(tmp_path):
    cfg, _ = parse_config(["--instance_data_dir", str(tmp_path), "--train_text_encoder_ti", "False",
                           "--random_flip", "--gradient_checkpointing", "0"])
    assert cfg.train_text_encoder_ti is False and cfg.random_flip is True and cfg.gradient_checkpointing is False
    cfg, _ = parse_config(["--preset", "face", "--instance_data_dir", str(tmp_path), "--rank", "8"])
    face = load_preset("face")
    assert cfg.rank == 8  # explicit flag wins
    assert cfg.optimizer.value == face["optimizer"] and cfg.learning_rate == face["learning_rate"]
    assert cfg.steps_per_image == face["steps_per_image"] and cfg.train_text_encoder_ti is True


def test_cli_random_crop_maps_to_center_crop(tmp_path):
    cfg, _ = parse_config(["--instance_data_dir", str(tmp_path), "--random_crop", "--cache_latents", "false"])
    assert cfg.center_crop is False


def test_adamw_with_prodigy_lr_warns_and_the_reverse(tmp_path):
    w = TrainConfig.from_sources(preset="face", instance_data_dir=str(tmp_path), optimizer="adamw").warnings()
    assert any("AdamW wants" in x for x in w)
    w = TrainConfig.from_sources(instance_data_dir=str(tmp_path), optimizer="prodigy", learning_rate=1e-4).warnings()
    assert any("Prodigy expects" in x for x in w)


def test_unknown_flag_suggests_the_nearest_and_nothing_starts(tmp_path):
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, "-m", "trainer", "--instance_data_dir", str(tmp_path),
                           "--learning_rat", "1e-4", "--output_dir", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "--learning_rat" in proc.stderr and "did you mean --learning_rate" in proc.stderr
    assert not out.exists()


def test_cli_bad_value_exits_2_naming_the_field(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainer", "--instance_data_dir", str(tmp_path), "--rank", "0",
                           "--optimizer", "sgd"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "--rank 0" in proc.stderr and "--optimizer 'sgd'" in proc.stderr


def test_config_file_and_json_roundtrip(tmp_path):
    cfg = TrainConfig.from_sources(instance_data_dir=str(tmp_path), rank=8, hub_token="hf_secret_value")
    path = tmp_path / "config.json"
    cfg.save(str(path))
    assert "hf_secret_value" not in path.read_text()
    again = TrainConfig.from_sources(config_file=str(path))
    assert again.rank == 8 and again.hub_token is None


def test_offline_hub_model_error_points_to_local_folder_or_tiny(tmp_path):
    from trainer.families import ModelLoadError, detect_family

    with pytest.raises(ModelLoadError) as err:
        detect_family("stabilityai/stable-diffusion-xl-base-1.0")
    assert "tiny-sdxl" in str(err.value) and "local" in str(err.value)
