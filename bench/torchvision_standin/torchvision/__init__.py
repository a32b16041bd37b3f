"""Benchmark-only stand-in for the part of torchvision that diffusers' advanced SDXL script imports (see
../README.md). Not a package the project depends on; never imported by the trainer or the app."""
from . import transforms  # noqa: F401

__version__ = "0.0.0+lora-studio-standin"
