"""LoRA studio trainer: DreamBooth LoRA with pivotal tuning for SDXL and SD 1.x/2.x.

Public API: ``TrainConfig``, ``train(config, on_event=None, stop=None) -> RunResult``, the event types.
Heavy libraries load lazily, so importing the package is cheap.
"""
from .config import ConfigError, TrainConfig
from .events import Checkpoint, Event, Failed, Finished, Sample, Started, Status, Step, read_events


def train(config, on_event=None, stop=None, **kwargs):
    from .loop import train as _train

    return _train(config, on_event=on_event, stop=stop, **kwargs)


__all__ = ["TrainConfig", "ConfigError", "train", "Event", "Started", "Status", "Step", "Sample", "Checkpoint",
           "Finished", "Failed", "read_events"]
