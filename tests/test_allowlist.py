"""ui/allowlist.py: every TrainConfig field is either a visitor's knob, filled by the app, or operator-only."""
from __future__ import annotations

from dataclasses import fields

import pytest

from trainer import TrainConfig
from ui.allowlist import (APP_FIELDS, OPERATOR_FIELDS, VISITOR_FIELDS, Policy, VisitorError, check_base_model,
                          check_caption_model, check_request, check_total_steps)

MUST_BE_OPERATOR_ONLY = ("push_to_hub", "hub_model_id", "hub_private", "hub_token", "report_to", "cache_dir",
                         "logging_dir", "pretrained_vae_model_name_or_path", "revision", "dataset_name",
                         "output_name")
NEVER_A_VISITOR_INPUT = MUST_BE_OPERATOR_ONLY + ("output_dir", "class_data_dir", "instance_data_dir",
                                                 "resume_from_checkpoint", "pretrained_model_name_or_path")


def test_every_field_has_exactly_one_owner():
    names = [f.name for f in fields(TrainConfig)]
    owners = {n: [g for g, group in (("visitor", VISITOR_FIELDS), ("app", APP_FIELDS),
                                     ("operator", OPERATOR_FIELDS)) if n in group] for n in names}
    assert all(len(v) == 1 for v in owners.values()), {n: v for n, v in owners.items() if len(v) != 1}
    assert len(set(VISITOR_FIELDS)) == len(VISITOR_FIELDS) and set(VISITOR_FIELDS) <= set(names)
    for n in MUST_BE_OPERATOR_ONLY:
        assert n in OPERATOR_FIELDS, n
    for n in NEVER_A_VISITOR_INPUT:
        assert n not in VISITOR_FIELDS, n


def test_the_advanced_form_shows_exactly_the_visitor_fields():
    from ui.train_tab import ADV_NAMES

    assert set(ADV_NAMES) == set(VISITOR_FIELDS)


@pytest.mark.parametrize("name", NEVER_A_VISITOR_INPUT[:-1])
def test_a_request_naming_an_operator_field_is_refused_with_its_name(name):
    with pytest.raises(VisitorError) as ei:
        check_request({"rank": 8, name: "x"}, Policy())
    assert f"`{name}`" in str(ei.value) and "operator" in str(ei.value)


def test_unknown_names_models_and_limits_are_refused():
    p = Policy(max_train_steps=100, max_resolution=512)
    check_request({"rank": 8, "max_train_steps": 100, "pretrained_model_name_or_path": "tiny-sdxl"}, p)
    for values, words in (({"nope": 1}, "not training settings"),
                          ({"pretrained_model_name_or_path": "/etc"}, "not offered"),
                          ({"pretrained_model_name_or_path": "./tiny-sdxl"}, "not offered"),
                          ({"max_train_steps": 101}, "limit of 100"),
                          ({"resolution": 1024}, "limit of 512")):
        with pytest.raises(VisitorError) as ei:
            check_request(values, p)
        assert words in str(ei.value), (values, str(ei.value))
    with pytest.raises(VisitorError, match="not offered"):
        check_caption_model(".", p)
    assert check_caption_model(" tiny-blip ", p) == "tiny-blip" and check_base_model("tiny-sd", p) == "tiny-sd"
    # steps asked for another way (per image, epochs) count too
    cfg = TrainConfig(max_train_steps=None, steps_per_image=50, repeats=1, train_batch_size=1)
    check_total_steps(cfg, 2, p)
    with pytest.raises(VisitorError, match="101 steps|150 steps"):
        check_total_steps(cfg, 3, p)
    with pytest.raises(VisitorError, match="limit of 100"):
        check_total_steps(TrainConfig(max_train_steps=None, num_train_epochs=30), 4, p)
    assert Policy(base_models=("my/model", "tiny-sd")).default_base_model(cuda=False) == "tiny-sd"
