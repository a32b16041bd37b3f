"""The sweep: every kept checkpoint x LoRA scales x prompts x fixed seeds, rendered through the Generate engine
(the same code path as the app's Generate tab), each image scored with CLIP, and the rule's recommendation
written to ``<run>/pick.json`` with a grid image ``<run>/pick/grid.png`` (rows checkpoints, columns scales).

Each checkpoint is first exported to ``<run>/pick/step-N/`` as a diffusers LoRA file (+ the learnt embeddings),
so the recommendation is a pair of files any tool loads, plus a scale.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

from .. import checkpoint as ckpt
from ..tiny import is_tiny
from .grid import draw_grid
from .record import PickError, image_name, write_pick
from .rule import RULE_TEXT, Cell, decide
from .scorer import DEFAULT_CLIP, ClipScorer, prompt_without_trigger

DEFAULT_SCALES = (0.6, 0.8, 1.0, 1.2)
HELD_OUT_PROMPTS = ("TOK on a beach", "a painting of TOK")
DEFAULT_SEEDS = (0, 1)


@dataclass
class SweepSettings:
    """What the sweep renders. ``None`` fields come from the run: its instance prompt + the held-out prompts
    (with the run's trigger), its validation steps, guidance and resolution; CLIP: tiny-clip for the tiny demo
    models, else ``openai/clip-vit-large-patch14``."""

    scales: tuple = DEFAULT_SCALES
    seeds: tuple = DEFAULT_SEEDS
    prompts: Optional[tuple] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    size: Optional[int] = None
    clip_model: Optional[str] = None
    scheduler: str = "Euler a"


def read_run_config(run_dir: str):
    from dataclasses import fields

    from ..config import ConfigError, TrainConfig
    from ..config.files import load_config_file

    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise PickError(f"{run_dir} is not a run folder (no config.json); give the folder training wrote.")
    known = {f.name for f in fields(TrainConfig)}  # a run written by another version may have other options
    values = {k: v for k, v in load_config_file(path).items() if k in known and k != "hub_token"}
    try:
        return TrainConfig.from_dict(values)
    except ConfigError as exc:
        raise PickError(f"{path} could not be read as a run configuration: {exc}") from None


def export_checkpoint(run_dir: str, cfg, family, step: int, path: str) -> tuple[str, Optional[str]]:
    """(diffusers LoRA file, embeddings file or None) of checkpoint ``path``, written once to pick/step-N/."""
    from .. import export

    out = os.path.join(run_dir, "pick", f"step-{step}")
    tensors = ckpt.load_checkpoint(path)["tensors"]
    lora = os.path.join(out, export.LORA_WEIGHTS)
    emb = os.path.join(out, export.embeddings_file_name(cfg)) if "embeddings" in tensors else None
    if not os.path.isfile(lora) or (emb and not os.path.isfile(emb)):
        os.makedirs(out, exist_ok=True)
        te_sds = [tensors.get(f"lora_te{i + 1}", {}) for i in range(2)] if cfg.train_text_encoder else []
        export.save_diffusers_lora(out, family, cfg, tensors["lora_unet"], te_sds)
        if emb:
            export.save_embeddings(out, cfg, tensors["embeddings"])
    return lora, emb


def _prompts(cfg, settings: SweepSettings) -> list[str]:
    trigger = cfg.abstractions[0] if cfg.abstractions else "TOK"
    if settings.prompts:
        return list(settings.prompts)
    held = [p.replace("TOK", trigger) for p in HELD_OUT_PROMPTS]
    return list(dict.fromkeys([cfg.instance_prompt] + held))


def run_sweep(run_dir: str, settings: Optional[SweepSettings] = None, *, engine=None, scorer=None,
              on_progress: Optional[Callable[[int, int, str], None]] = None, stop=None) -> dict:
    """Renders and scores the sweep of the finished run ``run_dir``, writes pick.json and the grid, and returns
    the record (as ``load_pick`` reads it). ``engine``: a ``generation.Engine`` to share (default: a new one);
    ``on_progress(done, total, what)`` after each image; ``stop`` (a threading.Event) ends it before the next
    image. Raises PickError for a run that cannot be swept (or a stopped sweep: nothing is written then)."""
    from generation import Engine, GenerateRequest, InferenceInputError

    from ..data.sources import load_items
    from ..families import detect_family, resolve

    settings = settings or SweepSettings()
    run_dir = os.path.abspath(run_dir)
    cfg = read_run_config(run_dir)
    kept = ckpt.list_checkpoints(os.path.join(run_dir, "checkpoints"))
    if not kept:
        raise PickError(f"{run_dir} has no complete checkpoint to sweep; train it (or resume it) first.")
    if not settings.scales or not settings.seeds:
        raise PickError("the sweep needs at least one LoRA scale and one seed")
    prompts = _prompts(cfg, settings)
    fit_prompts = [p for p in prompts if p != cfg.instance_prompt] or prompts
    try:
        items, _ = load_items(cfg)
    except Exception as exc:
        raise PickError(f"the training images of {run_dir} could not be read ({exc}); likeness compares with "
                        "them, so keep the dataset folder the run was trained on.") from None
    clip_id = settings.clip_model or ("tiny-clip" if is_tiny(cfg.pretrained_model_name_or_path) else DEFAULT_CLIP)
    scorer = scorer or ClipScorer(clip_id)
    reference = scorer.reference([it.load() for it in items])
    family = detect_family(resolve(cfg.pretrained_model_name_or_path))
    engine = engine or Engine()
    steps = settings.steps or cfg.validation_inference_steps
    guidance = settings.guidance if settings.guidance is not None else cfg.validation_guidance_scale
    size = settings.size or cfg.resolution
    bare = {p: prompt_without_trigger(p, cfg.token_abstraction) for p in prompts}
    text_emb = dict(zip(prompts, scorer.embed_texts([bare[p] for p in prompts])))
    total = len(fit_prompts) * len(settings.seeds) + len(kept) * len(settings.scales) * len(prompts) * len(
        settings.seeds)
    done = [0]
    img_dir = os.path.join(run_dir, "pick", "images")
    os.makedirs(img_dir, exist_ok=True)

    def render(prompt: str, seed: int, lora=None, emb=None, scale=1.0):
        req = GenerateRequest(base_model=cfg.pretrained_model_name_or_path, prompt=prompt, lora_path=lora,
                              embeddings_path=emb, token_abstraction=cfg.token_abstraction,
                              num_new_tokens_per_abstraction=cfg.num_new_tokens_per_abstraction,
                              scheduler=settings.scheduler, steps=steps, guidance_scale=guidance, width=size,
                              height=size, seed=int(seed), lora_scale=float(scale))
        if stop is not None and stop.is_set():
            raise PickError(f"the sweep was stopped; `python -m trainer pick {run_dir}` runs it again.")
        try:
            image = engine.generate(req).images[0]
        except InferenceInputError as exc:
            raise PickError(f"the sweep could not render '{prompt}': {exc}") from None
        done[0] += 1
        if on_progress:
            on_progress(done[0], total, f"{'base' if lora is None else os.path.basename(os.path.dirname(lora))}"
                                        f" x {scale:g}: {prompt}")
        return image

    def fit_of(images_by_prompt: dict) -> dict[str, float]:
        out = {}
        for p, ims in images_by_prompt.items():
            embs = scorer.embed_images(ims)
            out[p] = sum(scorer.prompt_fit(embs, text_emb[p].expand_as(embs))) / len(ims)
        return out

    # The base model (no LoRA, no learnt tokens) on each held-out prompt without its trigger: the reference fit.
    base_images = {p: [render(bare[p], s) for s in settings.seeds] for p in fit_prompts}
    base_fit = fit_of(base_images)
    cells, cell_images = [], {}
    for step, path in kept:
        lora, emb = export_checkpoint(run_dir, cfg, family, step, path)
        for scale in settings.scales:
            ims = {p: [render(p, s, lora, emb, scale) for s in settings.seeds] for p in prompts}
            all_ims = [im for p in prompts for im in ims[p]]
            likeness = scorer.likeness(scorer.embed_images(all_ims), reference)
            names = []
            for pi, p in enumerate(prompts):
                for s, im in zip(settings.seeds, ims[p]):
                    name = image_name(step, scale, pi, s)
                    im.save(os.path.join(img_dir, name))
                    names.append(name)
            cell = Cell(checkpoint=f"step-{step}", step=step, scale=float(scale),
                        likeness=sum(likeness) / len(likeness), fit_by_prompt=fit_of({p: ims[p] for p in fit_prompts}),
                        extra={"lora": lora, "embeddings": emb, "images": names})
            cells.append(cell)
            cell_images[(step, float(scale))] = [ims[p][0] for p in prompts]
    best, why = decide(cells, base_fit)
    grid = os.path.join(run_dir, "pick", "grid.png")
    draw_grid(cell_images, [s for s, _ in kept], [float(x) for x in settings.scales], (best.step, best.scale),
              prompts).save(grid)
    return write_pick(run_dir, cells=cells, best=best, why=why, rule_text=RULE_TEXT, base_fit=base_fit,
                      prompts=prompts, fit_prompts=fit_prompts, seeds=list(settings.seeds),
                      scales=[float(x) for x in settings.scales], clip_model=clip_id, steps=steps,
                      guidance=guidance, size=size, grid=grid)
