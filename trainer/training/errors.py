"""How a run ends: its result, or a TrainingError whose message and advice say what went wrong and what to do."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import checkpoint as ckpt


class TrainingError(RuntimeError):
    def __init__(self, message: str, advice: str = ""):
        super().__init__(message)
        self.advice = advice


@dataclass
class RunResult:
    run_dir: str
    step: int
    total_steps: int
    artifacts: dict[str, str] = field(default_factory=dict)
    stopped: bool = False
    final_loss: Optional[float] = None
    pick_error: Optional[str] = None   # --pick_best: why the sweep failed (the trained run itself is fine)


OOM_ADVICE = ("Out of memory. Lower the memory use, in this order: turn on --gradient_checkpointing, lower "
              "--train_batch_size (raise --gradient_accumulation_steps to keep the effective batch), use "
              "--optimizer adamw8bit, lower --rank, lower --resolution; or run with --auto_fit.")
NONFINITE_ADVICE = ("Lower the learning rate (AdamW) or use --optimizer prodigy, use --mixed_precision bf16 "
                    "instead of fp16, or the fp16-fix VAE.")


def describe_failure(exc: BaseException, run_dir: str) -> tuple[str, str]:
    """(message, advice) for a run that raised ``exc``: a full disk, out of memory, or the error's own text."""
    text = f"{exc}"
    if ckpt.is_disk_full(exc) and "disk is full" not in text:
        return ("the disk is full: the run could not write its files",  # no server path: visitors read this
                "Free some space (old runs, the Hugging Face cache) and resume (Resume in the app, "
                "--resume_from_checkpoint latest on the command line); the last complete checkpoint is intact.")
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
        return "out of memory: " + text.splitlines()[0][:300], OOM_ADVICE
    if isinstance(exc, TrainingError):
        return text, exc.advice
    return text, ""
