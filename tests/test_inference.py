"""Generation engine (trainer/inference.py) on the offline tiny SDXL / SD models, 64 px, 2 steps.

One SDXL run (LoRA + pivotal embeddings) and one SD 1.x run (LoRA only) are trained once per module through the
CLI, in parallel; "run B" is run A with its LoRA negated, so switching runs needs no third training.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.conftest import write_dataset
from generation import (SCHEDULERS, Engine, GenerateRequest, InferenceInputError, request_from_run,
                               validate_request)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2
PROMPT = "a photo of TOK dog"
BASE_PROMPT = "a photo of a dog"


def _train_cmd(model, data, out, ti: bool, steps: int):
    cmd = [sys.executable, "-m", "trainer", "--pretrained_model_name_or_path", model, "--instance_data_dir", data,
           "--output_dir", out, "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--resolution", "64",
           "--checkpointing_steps", "1000"]
    return cmd + (["--train_text_encoder_ti"] if ti else [])


def _negated_copy(src: str, dst: str) -> None:
    """Run B: run A with every lora_up / lora.up / lora_B weight negated (a different but valid LoRA)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "samples"))
    for name in os.listdir(dst):
        if not name.endswith(".safetensors") or name.endswith("_emb.safetensors"):
            continue
        path = os.path.join(dst, name)
        with safe_open(path, "pt") as f:
            meta = f.metadata()
            sd = {k: f.get_tensor(k) for k in f.keys()}
        sd = {k: (-v if (".up." in k or "lora_up" in k or "lora_B" in k) else v) for k, v in sd.items()}
        save_file(sd, path, metadata=meta)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # 64 px tiny models: one intra-op thread is ~5x faster than two on a busy 2-CPU box (no oversubscription).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_sdxl, tiny_sd):
    root = tmp_path_factory.mktemp("inference")
    data = str(root / "data")
    write_dataset(data, sizes=((64, 64),) * 3, captions=["a photo of TOK dog"] * 3)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    jobs = {
        "a": subprocess.Popen(_train_cmd("tiny-sdxl", data, str(root / "run_a"), True, 6), cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "sd": subprocess.Popen(_train_cmd("tiny-sd", data, str(root / "run_sd"), False, 3), cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    }
    for name, proc in jobs.items():
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"training run {name} failed:\n{err[-3000:]}"
    _negated_copy(str(root / "run_a"), str(root / "run_b"))
    return {"a": str(root / "run_a"), "b": str(root / "run_b"), "sd": str(root / "run_sd"), "root": root}


@pytest.fixture(scope="module")
def engine():
    eng = Engine()
    yield eng
    eng.release()


def arr(result, i=0) -> np.ndarray:
    return np.asarray(result.images[i]).astype(np.int16)


def maxdiff(a, b) -> int:
    return int(np.abs(arr(a) - arr(b)).max())


def base_req(**kw) -> GenerateRequest:
    fields = dict(base_model="tiny-sdxl", prompt=BASE_PROMPT, steps=STEPS, seed=1)
    fields.update(kw)
    return GenerateRequest(**fields)


@pytest.fixture(scope="module")
def base_image(engine):
    return engine.generate(base_req())


# ----------------------------------------------------------------------------------------------------------------
def test_request_from_run_fills_model_lora_embeddings(runs):
    req = request_from_run(runs["a"], prompt=PROMPT, seed=3)
    assert req.base_model == "tiny-sdxl"
    assert req.lora_path.endswith("pytorch_lora_weights.safetensors")
    assert req.embeddings_path.endswith("run_a_emb.safetensors")
    assert req.token_abstraction == "TOK" and req.num_new_tokens_per_abstraction == 2
    assert req.prompt == PROMPT and req.seed == 3
    sd = request_from_run(runs["sd"])
    assert sd.base_model == "tiny-sd" and sd.embeddings_path is None and sd.prompt == "a photo of TOK"
    with pytest.raises(InferenceInputError, match="config.json"):
        request_from_run(str(runs["root"] / "data"))


def test_run_differs_from_base_and_same_seed_is_same_image(engine, runs, base_image):
    assert base_image.info["size"] == (64, 64) and base_image.seeds == [1]
    again = engine.generate(base_req())
    assert maxdiff(again, base_image) == 0
    r1 = engine.generate(request_from_run(runs["a"], prompt=PROMPT, steps=STEPS, seed=1))
    r2 = engine.generate(request_from_run(runs["a"], prompt=PROMPT, steps=STEPS, seed=1))
    assert maxdiff(r1, r2) == 0
    assert maxdiff(r1, base_image) > 3
    other_seed = engine.generate(request_from_run(runs["a"], prompt=PROMPT, steps=STEPS, seed=2))
    assert maxdiff(r1, other_seed) > 3
    t = r1.info["timings"]
    assert set(t) >= {"load_s", "first_image_s", "total_s"} and t["total_s"] >= t["first_image_s"] > 0


def test_diffusers_and_kohya_files_give_the_same_image(engine, runs):
    diff = engine.generate(request_from_run(runs["a"], prompt=PROMPT, steps=STEPS, seed=5))
    kohya = engine.generate(request_from_run(runs["a"], prompt=PROMPT, steps=STEPS, seed=5,
                                             lora_path=os.path.join(runs["a"], "run_a.safetensors")))
    assert kohya.info["lora"].endswith("run_a.safetensors")
    assert maxdiff(diff, kohya) <= 1  # observed: identical (alpha = rank, same modules)


def test_embeddings_replace_tok_and_learnt_tokens_work(engine, runs):
    auto = engine.generate(request_from_run(runs["a"], prompt=PROMPT, steps=STEPS, seed=4))
    assert auto.info["prompt"] == "a photo of <s0><s1> dog"
    assert auto.info["tokens"] == {"TOK": ["<s0>", "<s1>"]}
    explicit = engine.generate(request_from_run(runs["a"], prompt="a photo of <s0><s1> dog", steps=STEPS, seed=4))
    assert maxdiff(auto, explicit) == 0
    for attr in ("tokenizer", "tokenizer_2"):
        tok = getattr(engine.pipe, attr)
        ids = tok("<s0><s1>", add_special_tokens=False).input_ids
        assert ids == tok.convert_tokens_to_ids(["<s0>", "<s1>"])  # two single tokens, not characters
    # The same LoRA without the embeddings: TOK stays literal and the image changes.
    no_emb = engine.generate(GenerateRequest(base_model="tiny-sdxl", prompt=PROMPT, steps=STEPS, seed=4,
                                             lora_path=os.path.join(runs["a"], "pytorch_lora_weights.safetensors")))
    assert no_emb.info["prompt"] == PROMPT and no_emb.info["embeddings"] is None
    assert maxdiff(no_emb, auto) > 0
    # A run folder as lora_path brings its embeddings along.
    folder = engine.generate(GenerateRequest(base_model="tiny-sdxl", prompt=PROMPT, steps=STEPS, seed=4,
                                             lora_path=runs["a"]))
    assert maxdiff(folder, auto) == 0 and folder.info["prompt"] == "a photo of <s0><s1> dog"


def test_switching_runs_keeps_the_base_pipeline_and_restores_it(engine, runs, base_image):
    engine.unload()
    pipe_id, loads = id(engine.pipe), engine.load_count
    vocab = {a: len(getattr(engine.pipe, a)) for a in ("tokenizer", "tokenizer_2")}
    a = engine.generate(request_from_run(runs["a"], prompt=PROMPT, steps=STEPS, seed=1))
    assert len(engine.pipe.tokenizer) == vocab["tokenizer"] + 2
    base = engine.generate(base_req())
    b = engine.generate(request_from_run(runs["b"], prompt=PROMPT, steps=STEPS, seed=1))
    assert id(engine.pipe) == pipe_id and engine.load_count == loads
    assert a.info["timings"]["load_s"] < 5 and base.info["pipeline_loads"] == loads
    assert maxdiff(base, base_image) == 0
    assert maxdiff(a, b) > 3
    engine.unload()  # explicit removal (delete_adapters + embeddings)
    after = engine.generate(base_req())
    assert maxdiff(after, base_image) == 0
    assert {a_: len(getattr(engine.pipe, a_)) for a_ in vocab} == vocab
    assert engine.pipe.text_encoder_2.get_input_embeddings().weight.shape[0] == vocab["tokenizer_2"]
    assert engine.pipe.get_list_adapters() in ({}, {"unet": []})
    assert id(engine.pipe) == pipe_id and engine.load_count == loads


def test_lora_scale(engine, runs, base_image):
    zero = engine.generate(request_from_run(runs["a"], prompt=BASE_PROMPT, steps=STEPS, seed=1, lora_scale=0.0))
    assert zero.info["lora_scale"] == 0.0
    # no TOK in the prompt, so the embeddings are unused: scale 0 must be exactly the base model.
    assert maxdiff(zero, base_image) == 0
    half = engine.generate(request_from_run(runs["a"], prompt=BASE_PROMPT, steps=STEPS, seed=1, lora_scale=0.5))
    full = engine.generate(request_from_run(runs["a"], prompt=BASE_PROMPT, steps=STEPS, seed=1, lora_scale=1.0))
    assert 0 < maxdiff(half, base_image) < maxdiff(full, base_image) + 1
    assert maxdiff(half, full) > 0


def test_random_seed_is_reported_and_reproduces(engine):
    r = engine.generate(base_req(seed=None))
    assert len(r.seeds) == 1 and isinstance(r.seeds[0], int)
    again = engine.generate(base_req(seed=r.seeds[0]))
    assert maxdiff(r, again) == 0


def test_several_images_progress_and_seeds(engine):
    calls = []
    r = engine.generate(base_req(seed=10, num_images=2), on_progress=lambda s, t: calls.append((s, t)))
    assert r.seeds == [10, 11] and len(r.images) == 2
    assert calls == [(i, 2 * STEPS) for i in range(1, 2 * STEPS + 1)]
    single = engine.generate(base_req(seed=11))
    assert int(np.abs(arr(r, 1) - arr(single)).max()) == 0


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_works(engine, name):
    r = engine.generate(base_req(scheduler=name, seed=3))
    img = arr(r)
    assert img.shape == (64, 64, 3) and r.info["scheduler"] == name
    assert type(engine.pipe.scheduler).__name__ in {
        "Euler a": "EulerAncestralDiscreteScheduler", "Euler": "EulerDiscreteScheduler",
        "DPM++ 2M": "DPMSolverMultistepScheduler", "DPM++ 2M Karras": "DPMSolverMultistepScheduler",
        "DDIM": "DDIMScheduler", "UniPC": "UniPCMultistepScheduler"}[name]
    if name == "DPM++ 2M Karras":
        assert engine.pipe.scheduler.config.use_karras_sigmas


def _bad_files(runs, tmp):
    from safetensors.torch import load_file

    ckpt = tmp / "lora.ckpt"
    torch.save({"x": torch.zeros(1)}, ckpt)
    pt = tmp / "emb.pt"
    torch.save({"x": torch.zeros(1)}, pt)
    text = tmp / "notes.safetensors"
    text.write_text("this is a text file, not tensors\n" * 10)
    emb = load_file(os.path.join(runs["a"], "run_a_emb.safetensors"))
    wide = tmp / "wide_emb.safetensors"
    save_file({"clip_l": torch.randn(2, 24), "clip_g": emb["clip_g"]}, str(wide))
    only_l = tmp / "only_l_emb.safetensors"
    save_file({"clip_l": emb["clip_l"]}, str(only_l))
    sd_kohya = os.path.join(runs["sd"], "run_sd.safetensors")
    sd_diffusers = os.path.join(runs["sd"], "pytorch_lora_weights.safetensors")
    sd_with_te = tmp / "sd_te.safetensors"  # an SD 1.x kohya LoRA that also trained its (one) text encoder
    sd = load_file(sd_kohya)
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    sd.update({f"{te}.lora_down.weight": torch.zeros(4, 32), f"{te}.lora_up.weight": torch.zeros(32, 4),
               f"{te}.alpha": torch.tensor(4.0)})
    save_file(sd, str(sd_with_te))
    return [
        (dict(lora_path=str(ckpt)), r"lora\.ckpt.*not a \.safetensors"),
        (dict(embeddings_path=str(pt)), r"emb\.pt.*not a \.safetensors"),
        (dict(lora_path=str(text)), r"notes\.safetensors.*not a valid safetensors"),
        (dict(lora_path=sd_diffusers), r"pytorch_lora_weights\.safetensors.*(cross-attention width|another model)"),
        (dict(lora_path=sd_kohya), r"run_sd\.safetensors.*cross-attention width 32 .* 80"),
        (dict(lora_path=str(sd_with_te)), r"sd_te\.safetensors.*SD 1\.x/2\.x.*base model is SDXL"),
        (dict(embeddings_path=str(wide)), r"wide_emb\.safetensors.*clip_l has width 24.*32"),
        (dict(embeddings_path=str(only_l)), r"only_l_emb\.safetensors.*lack clip_g"),
        (dict(embeddings_path=os.path.join(runs["a"], "run_a_emb.safetensors"), num_new_tokens_per_abstraction=3),
         r"2 rows.*3 new tokens"),
    ]


def test_bad_uploads_are_refused_and_the_engine_recovers(engine, runs, base_image, tmp_path):
    loaded = engine.generate(request_from_run(runs["a"], prompt=PROMPT, steps=STEPS, seed=1))
    for kw, pattern in _bad_files(runs, tmp_path):
        with pytest.raises(InferenceInputError, match=pattern):
            engine.generate(base_req(prompt=PROMPT, **kw))
        # the next plain generate works and matches the earlier base image
        assert maxdiff(engine.generate(base_req()), base_image) == 0, kw
    assert maxdiff(engine.generate(request_from_run(runs["a"], prompt=PROMPT, steps=STEPS, seed=1)), loaded) == 0
    assert engine.load_count == 1


@pytest.mark.parametrize("kw,pattern", [
    (dict(steps=0), "steps"), (dict(steps=151), "steps"), (dict(num_images=9), "num_images"),
    (dict(width=65), "width"), (dict(height=4096), "height"), (dict(width=32), "width"),
    (dict(scheduler="PLMS"), "scheduler"), (dict(guidance_scale=float("nan")), "guidance"),
    (dict(seed=-1), "seed"),
])
def test_bad_values_are_refused(kw, pattern):
    with pytest.raises(InferenceInputError, match=pattern):
        validate_request(base_req(**kw))


def test_sd_family_and_release(runs):
    eng = Engine()
    try:
        base = eng.generate(GenerateRequest(base_model="tiny-sd", prompt=BASE_PROMPT, steps=STEPS, seed=1,
                                            scheduler="DPM++ 2M"))
        assert base.info["family"] == "sd" and base.info["size"] == (64, 64) and eng.load_count == 1
        run = eng.generate(request_from_run(runs["sd"], steps=STEPS, seed=1, scheduler="DPM++ 2M"))
        assert maxdiff(run, base) > 0 and run.info["prompt"] == "a photo of TOK"  # no embeddings: TOK literal
        # the SDXL kohya LoRA and SDXL embeddings do not fit SD 1.x
        with pytest.raises(InferenceInputError, match="SDXL"):
            eng.generate(GenerateRequest(base_model="tiny-sd", prompt=BASE_PROMPT, steps=STEPS, seed=1,
                                         lora_path=os.path.join(runs["a"], "run_a.safetensors")))
        with pytest.raises(InferenceInputError, match="embeddings|LoRA"):
            eng.generate(request_from_run(runs["a"], base_model="tiny-sd", steps=STEPS, seed=1))
        again = eng.generate(GenerateRequest(base_model="tiny-sd", prompt=BASE_PROMPT, steps=STEPS, seed=1,
                                             scheduler="DPM++ 2M"))
        assert maxdiff(again, base) == 0 and eng.load_count == 1
        eng.release()
        assert eng.pipe is None
        eng.generate(GenerateRequest(base_model="tiny-sd", prompt=BASE_PROMPT, steps=1, seed=1))
        assert eng.load_count == 2
    finally:
        eng.release()


def test_concurrent_callers_are_serialised(engine, base_image):
    import threading

    results, errors = {}, []

    def worker(seed):
        try:
            results[seed] = engine.generate(base_req(seed=seed))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in (1, 2, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and set(results) == {1, 2}
    assert maxdiff(results[1], base_image) == 0 and maxdiff(results[2], base_image) > 0


def test_half_precision_engine_as_on_a_gpu(engine, runs):
    """On CUDA the engine runs the pipeline in bf16 (fp16 without bf16); the same LoRA + embeddings path in bf16
    on CPU gives a real image close to the fp32 one (and the embedding rows land in a bf16 matrix)."""
    req = request_from_run(runs["a"], prompt=PROMPT, steps=STEPS, seed=4)
    full = engine.generate(req)
    half = Engine(device="cpu", dtype=torch.bfloat16)
    try:
        out = half.generate(req)
        te = half.pipe.text_encoder.get_input_embeddings().weight
        assert te.dtype == torch.bfloat16 and torch.isfinite(te).all()
        base = half.generate(GenerateRequest(base_model="tiny-sdxl", prompt=BASE_PROMPT, steps=STEPS, seed=4))
    finally:
        half.release()
    a, f, b = arr(out), arr(full), arr(base)
    assert a.shape == f.shape and a.std() > 1
    # observed: mean |bf16 - fp32| 0.82, mean |bf16 - base| 2.7: the LoRA and embeddings are applied in bf16 too
    assert np.abs(a - f).mean() < 0.6 * np.abs(a - b).mean() and np.abs(a - b).max() > 3
