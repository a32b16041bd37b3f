"""LoRA studio trainer: DreamBooth LoRA with pivotal tuning for SDXL and SD 1.x/2.x.

This module is the trainer's public facade, the one the app (``ui/``) and other callers use:

- ``train(config, on_event=None, stop=None) -> RunResult``, ``TrainingError``, ``RunResult``;
- the configuration: ``TrainConfig``, ``ConfigError``, ``FieldError``, ``field_type``, ``coerce_field``,
  ``load_preset``, ``preset_info``, ``available_presets``;
- the events: ``Event``, ``Started``, ``Status``, ``Step``, ``Sample``, ``Checkpoint``, ``Finished``, ``Failed``,
  ``ValidationLoss``, ``Picked``, ``read_events``;
- the picker's record: ``load_pick``, ``PickError``;
- dataset reading and checks: ``check_dataset``, ``bucket_histogram``, ``load_image``, ``ImageProblem``,
  ``is_image_name``, ``Record``, ``IngestProblem``, ``collect_folder``, ``read_metadata_jsonl``,
  ``write_metadata_jsonl``;
- models: ``default_resolution_of_model``, ``is_tiny``; placeholders: ``replace_word``, ``new_tokens``;
- publishing: ``push_to_hub``, ``HubError``.

Names are resolved on first use, so ``import trainer`` stays cheap (no torch, no diffusers).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainingError": "training.errors", "RunResult": "training.errors",
    "TrainConfig": "config", "ConfigError": "config", "FieldError": "config", "field_type": "config",
    "coerce_field": "config", "load_preset": "config", "preset_info": "config", "available_presets": "config",
    "Event": "events", "Started": "events", "Status": "events", "Step": "events", "Sample": "events",
    "Checkpoint": "events", "Finished": "events", "Failed": "events", "read_events": "events",
    "FirstStep": "events", "describe_first_step": "events",
    "ValidationLoss": "events", "Picked": "events", "load_pick": "picking", "PickError": "picking",
    "check_dataset": "data.checks", "bucket_histogram": "data.buckets", "load_image": "data.images",
    "ImageProblem": "data.images", "is_image_name": "data.images", "Record": "data.problems",
    "IngestProblem": "data.problems", "collect_folder": "data.folders", "read_metadata_jsonl": "data.folders",
    "write_metadata_jsonl": "data.folders",
    "default_resolution_of_model": "families.resolution", "is_tiny": "tiny",
    "replace_word": "training.placeholders", "new_tokens": "training.placeholders",
    "push_to_hub": "export.hub", "HubError": "export.hub",
}

__all__ = sorted(_EXPORTS) + ["train"]


def train(config, on_event=None, stop=None, **kwargs):
    """``trainer.api.train`` (imported on first call: it brings torch, diffusers and accelerate)."""
    from .api import train as _train

    return _train(config, on_event=on_event, stop=stop, **kwargs)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
