"""Who may use the GPU now: a training, or the captioner, never both.

A training holds the GPU from the moment the worker takes its job until the job ends. Auto-caption asks
:meth:`GpuArbiter.captioning` for a device: the GPU when it is free (and then a training waits for the captioner
to finish before it starts), the CPU while a training holds it. Tests inject ``cuda`` to take the GPU path on a
machine without one.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, Optional

from trainer.devices import cuda_available  # a module name here, so a test can patch ui.gpu.cuda_available


class GpuArbiter:
    """Hands the GPU to one user at a time: a training, or any number of captioners (they share the one
    caption concurrency slot of the app anyway)."""

    def __init__(self, cuda: Optional[Callable[[], bool]] = None):
        self._cuda = cuda  # None: ask torch (looked up at call time, so a test can patch cuda_available)
        self._cv = threading.Condition()
        self._training = False
        self._captioners = 0

    def has_cuda(self) -> bool:
        return bool((self._cuda or cuda_available)())

    def training_holds(self) -> bool:
        with self._cv:
            return self._training

    @contextlib.contextmanager
    def captioning(self) -> Iterator[str]:
        """Yields the device the captioner must load onto: ``"cuda"`` when the GPU is free (held until the block
        ends), ``"cpu"`` without a GPU or while a training holds it."""
        with self._cv:
            on_gpu = self.has_cuda() and not self._training
            if on_gpu:
                self._captioners += 1
        try:
            yield "cuda" if on_gpu else "cpu"
        finally:
            if on_gpu:
                with self._cv:
                    self._captioners -= 1
                    self._cv.notify_all()

    @contextlib.contextmanager
    def training(self, on_wait: Optional[Callable[[], None]] = None) -> Iterator[None]:
        """Holds the GPU for a training; waits first (calling ``on_wait`` once) while a captioner uses it."""
        with self._cv:
            if self._captioners and on_wait is not None:
                on_wait()
            while self._captioners:
                self._cv.wait()
            self._training = True
        try:
            yield
        finally:
            with self._cv:
                self._training = False
                self._cv.notify_all()
