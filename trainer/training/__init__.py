"""The training run, split by role: ``trainer.py`` orchestrates setup -> steps -> finish; ``setup.py`` (data,
model, trainable parameters), ``batches.py`` (global batch -> rank slice, noise, timesteps), ``caches.py``
(latents, prompt embeddings, text-encoder offload), ``step.py`` (forward, loss, gradient sync, clipping,
scaling) and ``finish.py`` (checkpoints, samples, export) do the work; ``loss``, ``lora``, ``pivotal``,
``placeholders``, ``optim``, ``prodigy``, ``prior``, ``validation`` and ``transfer`` are the pieces they use.

Importing this package is cheap (no torch); import the module you need.
"""
