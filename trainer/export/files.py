"""Writing artifact files atomically (a temp file, then a rename), so a crash never leaves a half file under
the final name."""
from __future__ import annotations

import os
from typing import Optional

from safetensors.torch import save_file

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def atomic_save(tensors: dict, path: str, metadata: Optional[dict] = None) -> None:
    tmp = path + ".tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)
