"""Atomic, resumable checkpoints: ``checkpoints/step-N/``.

A checkpoint is written into ``step-N.tmp-<pid>``, every file fsynced, a ``COMPLETE`` marker written last, then
the folder is renamed into place (and the parent fsynced). An interrupt, a kill or a full disk at any moment
leaves at most a ``*.tmp-*`` folder that is never taken for "latest" and is swept on the next save.

Contents: LoRA weights (peft form), the learnt token rows, optimizer and LR-scheduler state, every RNG state and
the step, so ``--resume_from_checkpoint latest`` continues the *same* run.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    pass


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT from the OS, or the same error wrapped by safetensors / torch serialization."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def _nearly_full(exc: BaseException, folder: str) -> bool:
    """torch's zip writer reports a full disk as ``[enforce fail at inline_container.cc...]`` without errno:
    a write error on a disk with (almost) no space left is taken for a full disk."""
    if not isinstance(exc, (OSError, RuntimeError)):
        return False
    try:
        return shutil.disk_usage(folder).free < 16 * 2**20
    except OSError:
        return False


def disk_full_message(step: int, previous: Optional[str]) -> str:
    """What a run says when checkpoint ``step`` hit a full disk: no server path, and what to do."""
    kept = (f"the previous checkpoint (step {previous.rsplit('-', 1)[-1]}) is intact"
            if previous else "no earlier checkpoint exists")
    return (f"the disk is full: checkpoint step-{step} could not be saved and nothing of it was kept; {kept}. "
            "Free some disk space (old runs, caches), then resume the run (Resume in the app, "
            "--resume_from_checkpoint latest on the command line).")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = STEP_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.exists(os.path.join(path, "COMPLETE")):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest_checkpoint(root: str) -> Optional[str]:
    cps = list_checkpoints(root)
    return cps[-1][1] if cps else None


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def restore_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def save_checkpoint(root: str, step: int, *, tensors: dict[str, dict[str, torch.Tensor]], optimizer,
                    scheduler, meta: dict, generators: dict[str, torch.Generator], total_limit: Optional[int] = None,
                    fault_hook=None) -> str:
    """Writes checkpoint ``step`` atomically and returns its folder. ``tensors`` maps file stem -> state dict."""
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):  # leftovers of an interrupted save
        if ".tmp-" in name:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    final = os.path.join(root, f"step-{step}")
    tmp = f"{final}.tmp-{os.getpid()}"
    try:
        os.makedirs(tmp)
        written = []
        for stem, sd in tensors.items():
            if sd:
                path = os.path.join(tmp, f"{stem}.safetensors")
                save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, path)
                written.append(path)
        if fault_hook:
            fault_hook("mid-write")
        path = os.path.join(tmp, "optimizer.pt")
        torch.save(optimizer.state_dict(), path)
        written.append(path)
        path = os.path.join(tmp, "scheduler.pt")
        torch.save(scheduler.state_dict(), path)
        written.append(path)
        rng = {f"gen_{k}": g.get_state() for k, g in generators.items()}
        rng["torch_cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"torch_cuda_{i}"] = s
        path = os.path.join(tmp, "rng.safetensors")
        save_file(rng, path)
        written.append(path)
        path = os.path.join(tmp, "state.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({**meta, "step": step, "rng": rng_state()}, f)
        written.append(path)
        for p in written:
            _fsync_file(p)
        with open(os.path.join(tmp, "COMPLETE"), "w") as f:
            f.write(str(step))
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException as exc:
        full = is_disk_full(exc) or _nearly_full(exc, root)  # measured before the partial folder is removed
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise CheckpointError(disk_full_message(step, latest_checkpoint(root))) from None
        raise
    if total_limit:
        cps = list_checkpoints(root)
        for _, path in cps[:-total_limit]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(path: str) -> dict:
    if not os.path.exists(os.path.join(path, "COMPLETE")):
        raise CheckpointError(f"{path} is not a complete checkpoint (no COMPLETE marker)")
    with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    tensors = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors") and name != "rng.safetensors":
            tensors[name[: -len(".safetensors")]] = load_file(os.path.join(path, name))
    return {
        "state": state,
        "tensors": tensors,
        "optimizer": torch.load(os.path.join(path, "optimizer.pt"), weights_only=True, map_location="cpu"),
        "scheduler": torch.load(os.path.join(path, "scheduler.pt"), weights_only=True, map_location="cpu"),
        "rng": load_file(os.path.join(path, "rng.safetensors")),
    }


def restore_global_rng(rng: dict, state: dict) -> None:
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    restore_rng_state(state["rng"])
