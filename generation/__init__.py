"""The Generate engine: requests and their limits (``requests``), safe file loading and LoRA / embedding
compatibility checks (``files``), the samplers (``schedulers``), the rendering loop shared with the trainer's
sample images (``pipelines``) and the engine that keeps one base pipeline loaded (``engine``)."""
from .engine import Engine, get_engine
from .errors import InferenceInputError
from .requests import (LORA_WEIGHTS, MAX_NUM_IMAGES, MAX_STEPS, GenerateRequest, GenerateResult, request_from_run,
                       validate_request)
from .schedulers import SCHEDULERS

__all__ = ["SCHEDULERS", "GenerateRequest", "GenerateResult", "Engine", "InferenceInputError", "request_from_run",
           "validate_request", "get_engine", "MAX_NUM_IMAGES", "MAX_STEPS", "LORA_WEIGHTS"]
