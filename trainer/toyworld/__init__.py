"""The toy world: a synthetic world small enough to pretrain a diffusion model on 2 CPU cores, where learning is
measurable.

- ``render``: 64 px images of one flat coloured shape on white, and their captions.
- ``vae``: a constructed (not trained) ``AutoencoderKL``: 8x8x4 latents that keep colour and coarse shape.
- ``judge``: a small classifier on those latents (colour head, shape head), used only for measuring.
- ``base``: the pretrained SDXL-shaped pipeline ``toy-sdxl`` (two text encoders, ``text_time`` conditioning),
  built deterministically and cached by the content hash of this package (``trainer.tiny`` loads it by name).
- ``measure``: hit rates of prompts through a pipeline, judged.
"""
