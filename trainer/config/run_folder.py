"""What a configuration means for its run folder: the effective seed (chosen once, saved in ``config.json`` and
reused on resume) and whether ``--output_dir`` may be used by a new run."""
from __future__ import annotations

import json
import os
import secrets
from typing import Optional


def saved_seed(run_dir: str) -> Optional[int]:
    """The seed in ``<run_dir>/config.json``, or None (no file, no seed, unreadable)."""
    try:
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
            seed = json.load(f).get("seed")
    except (OSError, ValueError, AttributeError):
        return None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def settle_seed(cfg, run_dir: str) -> tuple:
    """(cfg with a seed, note or None). Without ``--seed`` a resumed run takes the seed its ``config.json`` saved
    (the same shuffle, noise and crops as before the interruption); a new run draws one, which ``config.json`` then
    saves."""
    if cfg.seed is not None:
        return cfg, None
    seed = saved_seed(run_dir) if cfg.resume_from_checkpoint else None
    if seed is not None:
        return cfg.replace(seed=seed), f"no --seed: resuming with the run's seed {seed} (from its config.json)"
    seed = secrets.randbelow(2**32)
    return cfg.replace(seed=seed), f"no --seed: this run uses seed {seed} (saved in config.json; a resume reuses it)"


#: What a run writes into its folder: any of these there means the folder holds a run.
RUN_FILES = ("config.json", "events.jsonl", "checkpoints", "pytorch_lora_weights.safetensors")


def output_dir_problem(cfg) -> Optional[str]:
    """Why a new run may not write into ``--output_dir``, or None: the folder exists and is not empty (another
    run's LoRA would be overwritten, its checkpoints mixed with this run's, and ``resume latest`` would pick
    theirs), unless this run resumes (``--resume_from_checkpoint``)."""
    folder = cfg.output_dir
    if cfg.resume_from_checkpoint or not os.path.isdir(folder):
        return None
    entries = sorted(e for e in os.listdir(folder) if not e.startswith("."))
    if not entries:
        return None
    run = [e for e in entries if e in RUN_FILES]
    what = f"another run ({', '.join(run)})" if run else f"{len(entries)} file(s) ({', '.join(entries[:3])} ...)"
    return (f"--output_dir {folder} already holds {what}: a new run there would overwrite its files and mix "
            "checkpoints. Give a new (or empty) --output_dir, or continue that run with "
            "--resume_from_checkpoint latest.")
