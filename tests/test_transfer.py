"""Host-to-device copies of the training step: queued without a stall on CUDA, and really used by the loop."""
from __future__ import annotations

import torch

import trainer.families.sdxl as sdxl_family
import trainer.training.batches as loop
from trainer.training.trainer import Trainer
from trainer import TrainConfig
from trainer.devices import to_device


class HostTensor:
    """Stands for a CPU tensor on a machine without CUDA: records what to_device asks of it."""

    def __init__(self, calls):
        self.device, self.calls = torch.device("cpu"), calls

    def to(self, *args, **kwargs):
        self.calls.append(("to", args, kwargs))
        return self

    def pin_memory(self):
        self.calls.append(("pin_memory",))
        return self


def test_cuda_copies_are_pinned_and_non_blocking():
    calls = []
    to_device(HostTensor(calls), "cuda:0")
    assert calls == [("pin_memory",), ("to", (torch.device("cuda:0"),), {"non_blocking": True})]


def test_cpu_keeps_the_plain_copy():
    t = torch.arange(6, dtype=torch.float32)
    assert to_device(t, "cpu") is t and to_device(t, torch.device("cpu")) is t


def test_every_host_tensor_of_the_step_goes_through_to_device(monkeypatch, dataset, tmp_path, tiny_sdxl):
    """Noise, timesteps and SDXL's size ids are made on the host each step; each must reach the UNet through
    to_device (a plain .to() there would stall a GPU on every step)."""
    made = []

    def spy(t, device):
        out = to_device(t, device)
        made.append(out)
        return out

    monkeypatch.setattr(loop, "to_device", spy)
    monkeypatch.setattr(sdxl_family, "to_device", spy)
    cfg = TrainConfig.from_sources(pretrained_model_name_or_path="tiny-sdxl", instance_data_dir=dataset,
                                   output_dir=str(tmp_path / "r"), max_train_steps=3, rank=4, seed=1,
                                   train_batch_size=2)
    t = Trainer(cfg).open()
    t.setup()
    fed = []

    def record(module, args, kwargs):
        fed.append((args[0], args[1], kwargs["added_cond_kwargs"]["time_ids"]))

    t.comps.unet.register_forward_pre_hook(record, with_kwargs=True)
    made.clear()
    t.train_steps(0, t.total)
    assert len(fed) == 3
    ids = {id(x) for x in made}
    for noisy, timesteps, time_ids in fed:
        assert id(timesteps) in ids and id(time_ids) in ids
        assert timesteps.shape == (2,) and time_ids.shape == (2, 6)
    # the noise went through it too: one (batch, 4, h, w) tensor per step
    assert sum(1 for x in made if x.ndim == 4) == 3
