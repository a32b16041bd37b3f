"""A concept to teach the toy model, its training images, the object preset scaled to the toy, and the
evaluation of a finished run (concept hit rate with and without the learnt tokens, prior retention).

The concept is a colour the base never saw on a shape it knows (``CONCEPT``: a yellow circle): the unseen plus
shape only reached 3-9/16 at CPU budgets in the prototype, the colour 16/16."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .render import render

CONCEPT = ("yellow", "circle")
PRIOR = ("red", "circle")
#: What counts as a hit: the colour. At the CPU build budget the base draws the named colour reliably but the named
#: shape in only ~40% of samples (toyworld.json), so shapes are not judged.
CONCEPT_HIT = ("yellow", None)
PRIOR_HIT = ("red", None)
CLASS_PROMPT = "a photo of a circle"


def write_concept_images(folder: str, n: int = 4, concept=CONCEPT, seed: int = 7,
                         caption: str = "a photo of TOK") -> str:
    """``n`` renders of ``concept`` with ``.txt`` captions into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(render(*concept, rng)).save(os.path.join(folder, f"concept{i}.png"))
        with open(os.path.join(folder, f"concept{i}.txt"), "w", encoding="utf-8") as f:
            f.write(caption)
    return folder


def write_class_images(folder: str, n: int = 24, shape: str = CONCEPT[1], seed: int = 11) -> str:
    """``n`` renders of ``shape`` in the base colours: real class images of ``CLASS_PROMPT``."""
    from .render import BASE_COLOURS

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(render(BASE_COLOURS[i % len(BASE_COLOURS)], shape, rng)).save(
            os.path.join(folder, f"class{i:03d}.png"))
    return folder


def toy_settings(data_dir: str, output_dir: str, **overrides) -> dict:
    """The object preset (pivotal tuning, 2 tokens, first half of the steps for the tokens) scaled to the toy:
    AdamW at the rates the toy measured best (Prodigy is compared in bench/quality.py), rank 4, 64 px."""
    values = dict(
        preset="object", pretrained_model_name_or_path="toy-sdxl", instance_data_dir=data_dir,
        output_dir=output_dir, resolution=64, max_train_steps=300, rank=4, optimizer="adamw",
        learning_rate=4e-4, text_encoder_lr=3e-2, train_text_encoder_ti=True, train_text_encoder_ti_frac=0.5,
        checkpointing_steps=10 ** 6, validation_prompt=None, seed=0, save_precision="fp32")
    values.update(overrides)
    return values


@dataclass
class RunScores:
    concept: float        # "a photo of TOK" with LoRA + tokens
    lora_only: float      # the LoRA with "TOK" left as text (no embeddings)
    prior: float          # "a photo of a red circle" with LoRA + tokens
    base_concept: float   # the base with "a photo of TOK"
    base_prior: float


def score_run(run_dir: str, seeds=range(32), model: str = "toy-sdxl", pipe_judge=None, **kw) -> RunScores:
    """Judged hit rates of a finished run through the diffusers file (``load_lora_weights`` + the embeddings)."""
    from ..tiny import resolve_model_id
    from .measure import load_toy, prompt_hit_rate

    pipe, judge = pipe_judge or load_toy(resolve_model_id(model))
    seeds = list(seeds)
    base_concept = prompt_hit_rate(pipe, judge, "a photo of TOK", *CONCEPT_HIT, seeds, **kw)
    base_prior = prompt_hit_rate(pipe, judge, "a photo of a red circle", *PRIOR_HIT, seeds, **kw)
    with_lora(pipe, run_dir)
    try:
        lora_only = prompt_hit_rate(pipe, judge, "a photo of TOK", *CONCEPT_HIT, seeds, **kw)
        tokens = load_embeddings(pipe, run_dir)
        try:
            concept = prompt_hit_rate(pipe, judge, f"a photo of {''.join(tokens)}", *CONCEPT_HIT, seeds, **kw)
            prior = prompt_hit_rate(pipe, judge, "a photo of a red circle", *PRIOR_HIT, seeds, **kw)
        finally:
            unload_embeddings(pipe, tokens)
    finally:
        pipe.unload_lora_weights()
    return RunScores(concept, lora_only, prior, base_concept, base_prior)


def with_lora(pipe, run_dir: str, weight_name: str = "pytorch_lora_weights.safetensors") -> None:
    pipe.load_lora_weights(run_dir, weight_name=weight_name)


def embeddings_file(run_dir: str) -> str:
    names = [f for f in os.listdir(run_dir) if f.endswith("_emb.safetensors")]
    if len(names) != 1:
        raise FileNotFoundError(f"{run_dir} holds {len(names)} embedding files")
    return os.path.join(run_dir, names[0])


def load_embeddings(pipe, run_dir: str, tokens=("<s0>", "<s1>")) -> list[str]:
    """Loads the run's ``clip_l`` / ``clip_g`` rows as the model card says; returns the tokens."""
    from safetensors.torch import load_file

    sd = load_file(embeddings_file(run_dir))
    pipe.load_textual_inversion(sd["clip_l"], token=list(tokens), text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(sd["clip_g"], token=list(tokens), text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    return list(tokens)


def unload_embeddings(pipe, tokens) -> None:
    pipe.unload_textual_inversion(list(tokens), tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    pipe.unload_textual_inversion(list(tokens), tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2)
