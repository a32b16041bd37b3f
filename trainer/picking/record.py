"""``<run>/pick.json``: the sweep's scores and its recommendation, written atomically; ``load_pick`` reads it
back with the file paths made absolute (they are stored relative to the run folder, so a moved run still works)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

PICK_FILE = "pick.json"
VERSION = 1


class PickError(RuntimeError):
    """The sweep or its record cannot be made or read (the message says why and what to do)."""


def image_name(step: int, scale: float, prompt_index: int, seed: int) -> str:
    return f"step-{step}_scale-{scale:g}_p{prompt_index}_seed-{seed}.png"


@dataclass
class Pick:
    """The recommendation of a run's sweep: which checkpoint files and LoRA scale to use, and why."""

    run_dir: str
    checkpoint: str
    step: int
    scale: float
    lora_path: str
    embeddings_path: Optional[str]
    why: str
    rule_text: str
    grid_path: str
    record: dict = field(default_factory=dict, repr=False)   # everything pick.json holds (cells, base fit, settings)


def _rel(run_dir: str, path: Optional[str]) -> Optional[str]:
    return None if path is None else os.path.relpath(path, run_dir)


def write_pick(run_dir: str, *, cells, best, why: str, rule_text: str, base_fit: dict, prompts: list,
               fit_prompts: list, seeds: list, scales: list, clip_model: str, steps: int, guidance: float,
               size, grid: str) -> dict:
    """Writes pick.json (atomically) and returns its content."""
    def cell_dict(c):
        return {"checkpoint": c.checkpoint, "step": c.step, "scale": c.scale, "likeness": c.likeness,
                "prompt_fit": c.prompt_fit, "fit_by_prompt": c.fit_by_prompt, "margin": c.margin,
                "keeps_prompt": c.keeps_prompt, "lora": _rel(run_dir, c.extra["lora"]),
                "embeddings": _rel(run_dir, c.extra["embeddings"]), "images": c.extra["images"]}

    record = {
        "version": VERSION, "rule_text": rule_text, "why": why,
        "pick": cell_dict(best),
        "settings": {"prompts": prompts, "fit_prompts": fit_prompts, "seeds": seeds, "scales": scales,
                     "clip_model": clip_model, "steps": steps, "guidance": guidance, "size": size},
        "base_fit": base_fit, "cells": [cell_dict(c) for c in cells],
        "grid": _rel(run_dir, grid), "images_dir": os.path.join("pick", "images"),
    }
    path = os.path.join(run_dir, PICK_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)
    return record


def load_pick(run_dir: str) -> Optional[Pick]:
    """The recommendation of ``run_dir`` (None when it has not been swept). Raises PickError for a damaged
    pick.json or one whose files are gone."""
    run_dir = os.path.abspath(run_dir)
    path = os.path.join(run_dir, PICK_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
        p = rec["pick"]
        pick = Pick(run_dir=run_dir, checkpoint=p["checkpoint"], step=int(p["step"]), scale=float(p["scale"]),
                    lora_path=os.path.join(run_dir, p["lora"]),
                    embeddings_path=os.path.join(run_dir, p["embeddings"]) if p.get("embeddings") else None,
                    why=rec["why"], rule_text=rec["rule_text"], grid_path=os.path.join(run_dir, rec["grid"]),
                    record=rec)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PickError(f"{path} is damaged ({type(exc).__name__}: {exc}); run `python -m trainer pick "
                        f"{run_dir}` again to redo the sweep.") from None
    if not os.path.isfile(pick.lora_path):
        raise PickError(f"the picked LoRA file {pick.lora_path} is gone; run `python -m trainer pick {run_dir}` "
                        "again to redo the sweep.")
    return pick
