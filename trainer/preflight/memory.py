"""Memory probes for the preflight: the process's peak RSS on the CPU (kernel counter, or a sampling thread),
CUDA's allocator counters on a GPU, the memory budget, and the numbers as text."""
from __future__ import annotations

import gc
import threading
from typing import Optional

GiB = 1024 ** 3


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def _proc_status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:
        v = _proc_status_kb("VmRSS")
        if v is not None:
            return v
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS counter of this process (Linux 4.0+); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return _proc_status_kb("VmHWM") is not None
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


class _RssSampler:
    """Peak RSS by sampling, for systems where the kernel's counter cannot be reset."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak = interval, current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, current_rss())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())


def available_memory() -> int:
    """Default budget: 92 % of free CUDA memory, or the available RAM on CPU."""
    if _cuda():
        import torch

        gc.collect()
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.92)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    return 8 * GiB


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / 1024 ** 2:.0f} MiB"


def fmt_seconds(s: float) -> str:
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
