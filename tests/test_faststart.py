"""Start fast, scale with the dataset (issue 16): one model load per ``train()`` with ``--auto_fit`` (the
preflight measures on the components the run trains with), one decode per image, latents cached on disk by
content + bucket + flip + VAE (a second run never runs the VAE; torn or corrupt entries are re-encoded), and the
time to the first step by phase in the event stream, the CLI and the app log."""
from __future__ import annotations

import functools
import io
import os
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_dataset
from trainer import TrainConfig, read_events, train

SIZES = ((256, 192), (192, 256), (200, 200))


@pytest.fixture(autouse=True)
def _flush_denormals():
    torch.set_flush_denormal(True)


@pytest.fixture
def spies(monkeypatch):
    """Counts ``from_pretrained`` per component (class, subfolder), image decodes and VAE encodes (images)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from trainer.data import sources

    counts: Counter = Counter()
    for cls in (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection):
        original = cls.from_pretrained.__func__

        def counted(klass, *a, _orig=original, **kw):
            counts[("load", klass.__name__, kw.get("subfolder"))] += 1
            return _orig(klass, *a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(counted))
    encode = AutoencoderKL.encode

    def counted_encode(self, x, *a, **kw):
        counts["vae_images"] += x.shape[0]
        return encode(self, x, *a, **kw)

    monkeypatch.setattr(AutoencoderKL, "encode", counted_encode)
    load_image = sources.load_image

    def counted_load(path, *a, **kw):
        counts[("decode", os.path.basename(path))] += 1
        return load_image(path, *a, **kw)

    monkeypatch.setattr(sources, "load_image", counted_load)
    return counts


def _cfg(tmp_path, **kw):
    base = dict(pretrained_model_name_or_path="tiny-sdxl", instance_data_dir=str(tmp_path / "data"),
                output_dir=str(tmp_path / "run"), resolution=128, bucket_step=32, max_train_steps=2, seed=5,
                train_text_encoder_ti=True, train_text_encoder_ti_frac=0.5, optimizer="adamw",
                learning_rate=1e-3, text_encoder_lr=1e-2)
    base.update(kw)
    return TrainConfig.from_sources(**base)


def _loads(counts):
    return {k[1:]: v for k, v in counts.items() if k[0] == "load"}


def test_auto_fit_loads_once_decodes_once_and_trains_as_without_it(tmp_path, tiny_sdxl, spies):
    write_dataset(str(tmp_path / "data"), sizes=SIZES)
    seen = []
    res = train(_cfg(tmp_path, auto_fit=True), on_event=seen.append)
    assert res.step == 2
    loads = _loads(spies)
    assert loads == {("UNet2DConditionModel", "unet"): 1, ("AutoencoderKL", "vae"): 1,
                     ("CLIPTextModel", "text_encoder"): 1, ("CLIPTextModelWithProjection", "text_encoder_2"): 1}
    decodes = {k[1]: v for k, v in spies.items() if k[0] == "decode"}
    assert decodes == {f"img{i}.png": 1 for i in range(len(SIZES))}  # size, checks, hash and latent: one decode
    assert spies["vae_images"] == len(SIZES)  # one latent per image (no flip) for the measurement and the run
    assert any(e.type == "status" and e.phase == "preflight" for e in seen)
    # time to the first step, by phase, in the event log (what the CLI and the app show)
    first = [e for e in read_events(str(tmp_path / "run" / "events.jsonl")) if e["type"] == "first_step"]
    assert len(first) == 1
    phases = first[0]["phases"]
    assert set(phases) == {"load", "checks", "caches", "preflight", "first step", "other"}
    assert phases["load"] > 0 and phases["preflight"] > 0 and phases["caches"] > 0
    assert first[0]["seconds"] == pytest.approx(sum(phases.values()), abs=0.01)

    # the measurement left the shared model as loaded: the run's LoRA is the one of a run without --auto_fit
    plain = tmp_path / "plain"
    train(_cfg(tmp_path, output_dir=str(plain)))
    a = load_file(str(tmp_path / "run" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(plain / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_a_plan_that_lowers_the_resolution_reencodes_only_the_new_buckets(tmp_path, tiny_sdxl, spies):
    from trainer.preflight import preflight
    from trainer.training.inputs import RunInputs

    write_dataset(str(tmp_path / "data"), sizes=SIZES)
    cfg = _cfg(tmp_path, resolution=256, train_text_encoder_ti=False).validate()
    inputs = RunInputs()
    plan = preflight(cfg, measure_steps=2, budget_bytes=1, min_resolution=128, inputs=inputs)
    assert not plan.fits and plan.changes[-1] == "resolution 256 -> 128 px"
    assert len(plan.attempts) == 3  # as given, + gradient checkpointing, + 128 px
    assert sum(_loads(spies).values()) == 4  # UNet, VAE, two text encoders: once for the three measurements
    assert spies["vae_images"] == 2 * len(SIZES)  # every image at 256 px, then at 128 px; never again
    assert not any("lora" in n for n, _ in inputs.comps.unet.named_parameters())  # released after measuring


def test_auto_fit_that_lowers_the_resolution_encodes_each_latent_once(tmp_path, tiny_sdxl, spies, monkeypatch):
    """The whole ``train()`` with ``--auto_fit``: the plan lowers 256 -> 128 px, the run trains at 128 px. Every
    (image, bucket) latent is encoded exactly once over the measurements and the run: the 256 px ones by the
    setup's read, the 128 px ones by the measurement that first needs them; the run itself encodes none."""
    from trainer.data.checks import pixel_sha256
    from trainer.preflight import plan as plan_mod
    from trainer.training.inputs import run_buckets
    from trainer.training.latents import LatentStore

    write_dataset(str(tmp_path / "data"), sizes=SIZES)
    encoded: Counter = Counter()  # (image content, bucket, flip) -> VAE encodes
    encode = LatentStore.encode

    def counted(self, image, bucket, flip, crop_seed=0):
        encoded[(pixel_sha256(image), tuple(bucket), flip)] += 1
        return encode(self, image, bucket, flip, crop_seed)

    monkeypatch.setattr(LatentStore, "encode", counted)
    real_measure, measured = plan_mod.measure_run, []

    def over_budget_above_128(cfg, **kw):  # the fault: a real measurement whose peak fits only at 128 px
        m = real_measure(cfg, **kw)
        measured.append((cfg.resolution, sum(encoded.values())))
        m.peak_bytes = 1 if cfg.resolution <= 128 else 2**60
        return m

    monkeypatch.setattr(plan_mod, "measure_run", over_budget_above_128)
    monkeypatch.setattr(plan_mod, "available_memory", lambda: 2**40)
    import trainer.preflight as preflight_pkg  # train() imports it at call time; tiny sizes: allow 128 px

    monkeypatch.setattr(preflight_pkg, "preflight", functools.partial(preflight_pkg.preflight, min_resolution=128))
    res = train(_cfg(tmp_path, resolution=256, auto_fit=True, train_text_encoder_ti=False))
    assert res.step == 2
    assert [r for r, _ in measured] == [256, 256, 128]  # as given, + gradient checkpointing, + 128 px
    assert sum(_loads(spies).values()) == 4  # UNet, VAE, two text encoders: once for measurements and run
    cfg = _cfg(tmp_path)
    per_res = {r: sum(n for (_, b, _f), n in encoded.items() if b in run_buckets(cfg, r)) for r in (256, 128)}
    assert per_res == {256: len(SIZES), 128: len(SIZES)}, encoded  # each image at 256 px and at 128 px...
    assert set(encoded.values()) == {1}, encoded  # ...each exactly once: nothing encoded twice
    assert measured[1][1] == len(SIZES)  # the second 256 px measurement encoded nothing new
    assert spies["vae_images"] == 2 * len(SIZES)  # and the run at 128 px read all of its latents back
    first = [e for e in read_events(str(tmp_path / "run" / "events.jsonl")) if e["type"] == "started"]
    assert any("resolution 256 -> 128 px" in n for n in first[0]["notes"])


def test_second_run_on_the_same_images_never_runs_the_vae(tmp_path, tiny_sdxl, spies):
    from trainer.training.trainer import Trainer

    write_dataset(str(tmp_path / "data"), sizes=SIZES)
    cfg = _cfg(tmp_path, random_flip=True, train_text_encoder_ti=False)
    first = Trainer(cfg).open()
    first.setup()
    assert spies["vae_images"] == 2 * len(SIZES)  # each image and its flip
    cache = tmp_path / "data" / ".latent_cache"  # next to the dataset by default
    assert len(list(cache.glob("*.safetensors"))) == 2 * len(SIZES)
    assert all(isinstance(k, str) for k in first.latents.entries.values())  # RAM holds keys, not tensors

    second = Trainer(cfg.replace(output_dir=str(tmp_path / "run2"))).open()
    second.setup()
    assert spies["vae_images"] == 2 * len(SIZES)  # zero encodes on the second run
    mb1 = first.batches.micro_batch(0, first.accelerator.device)
    mb2 = second.batches.micro_batch(0, second.accelerator.device)
    torch.testing.assert_close(mb1.latents, mb2.latents, rtol=0, atol=0)

    # another VAE (other weights) is another key: encoded again, into its own entries
    third = Trainer(cfg.replace(output_dir=str(tmp_path / "run3"), latent_cache_dir=str(tmp_path / "c3"))).open()
    third.setup()
    assert spies["vae_images"] == 4 * len(SIZES)  # a new cache folder: encoded again
    vae = third.comps.vae
    with torch.no_grad():
        next(vae.parameters()).add_(0.01)
    vae.__dict__.pop("_lora_studio_fingerprint")
    from trainer.training.latents import LatentStore

    other = LatentStore(vae, str(tmp_path / "c3"), center_crop=True, interpolation="lanczos")
    assert other.vae_id != third.latents.store.vae_id


def test_torn_and_corrupt_cache_entries_are_encoded_again_not_fatal(tmp_path, tiny_sdxl, spies, monkeypatch):
    import safetensors.torch as st

    from trainer.training.trainer import Trainer

    write_dataset(str(tmp_path / "data"), sizes=SIZES)
    cfg = _cfg(tmp_path, train_text_encoder_ti=False)
    cache = tmp_path / "data" / ".latent_cache"
    real_save, calls = st.save_file, [0]

    def crash_mid_write(tensors, filename, metadata=None):  # the fault: the second entry dies half written
        calls[0] += 1
        if calls[0] == 2:
            with open(filename, "wb") as f:
                f.write(st.save(tensors, metadata=metadata)[:40])
            raise KeyboardInterrupt("killed while writing a cache entry")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg).open().setup()
    monkeypatch.setattr(st, "save_file", real_save)
    entries = sorted(cache.glob("*.safetensors"))
    assert len(entries) == 1  # the torn write left no entry under a real name
    entries[0].write_bytes(b"not a safetensors file")  # and the one finished entry is damaged afterwards
    before = spies["vae_images"]
    t = Trainer(cfg.replace(output_dir=str(tmp_path / "run2"))).open()
    t.setup()
    assert spies["vae_images"] - before == len(SIZES)  # 1 corrupt + 2 missing: encoded again, run goes on
    assert t.latents.store.rewrites == 1
    assert len(list(cache.glob("*.safetensors"))) == len(SIZES)


def test_time_to_first_step_in_the_cli_and_the_app_log():
    from trainer.events import FirstStep
    from trainer.progress import CliProgress
    from ui.train_tab import summarize

    ev = FirstStep(seconds=9.5, phases={"load": 4.0, "checks": 0.5, "caches": 2.0, "preflight": 2.5,
                                        "first step": 0.4, "other": 0.1})
    out = io.StringIO()
    CliProgress(stream=out)(ev)
    line = "time to first step 9.5 s: load 4.0 s, checks 0.5 s, caches 2.0 s, preflight 2.5 s, first step 0.4 s, " \
           "other 0.1 s"
    assert out.getvalue().strip() == line
    view = {"state": "running", "run": "r", "position": 0, "events": [ev.to_dict()]}
    assert summarize(view)["log"] == [f"[first step] {line}"]
