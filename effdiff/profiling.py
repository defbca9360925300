"""Memory samplers: host RSS, and device memory through NVML or, on Jetson, the shared system pool.

Measuring is opt-in: the runtime starts a sampler only when its caller asks for memory figures
(`effdiff generate` prints peak RSS; the bench harness wraps timed runs), never on its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil


def is_jetson() -> bool:
    return Path("/etc/nv_tegra_release").exists()


class _Sampler:
    """Samples `read()` every `interval_s` in a background thread between __enter__ and __exit__."""

    def __init__(self, read: Callable[[], float], interval_s: float) -> None:
        self._read = read
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.baseline = 0.0
        self.peak = 0.0

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self._read())

    def __enter__(self) -> _Sampler:
        self.baseline = self.peak = self._read()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self._read())


class PeakRSS(_Sampler):
    """Context manager: `peak_bytes` and `baseline_bytes` of this process's host RSS while the block runs."""

    def __init__(self, interval_s: float = 0.005) -> None:
        proc = psutil.Process()
        super().__init__(lambda: float(proc.memory_info().rss), interval_s)

    def __enter__(self) -> PeakRSS:
        super().__enter__()
        return self

    @property
    def peak_bytes(self) -> int:
        return int(self.peak)

    @property
    def baseline_bytes(self) -> int:
        return int(self.baseline)

    @property
    def peak_gib(self) -> float:
        return self.peak / 2**30


class GpuMemory:
    """Peak minus baseline device memory in MiB, sampled every 2 ms: through NVML on discrete GPUs; on
    Jetson (one memory pool for CPU and GPU, no NVML memory figures) the system's used memory from
    /proc/meminfo stands for it. `peak_mib` stays None where neither applies."""

    def __init__(self) -> None:
        self._jetson = is_jetson()
        self._nvml: Any = None
        if not self._jetson:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
                self._nvml = pynvml
            except Exception:  # no NVML library, driver or GPU: nothing to measure
                self._nvml = None
        self.peak_mib: float | None = None

    @property
    def available(self) -> bool:
        return self._jetson or self._nvml is not None

    def used_mib(self) -> float:
        if self._jetson:
            mem = psutil.virtual_memory()
            return (mem.total - mem.available) / 2**20
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20 if self._nvml else 0.0

    def measure(self, fn: Callable[[], Any]) -> Any:
        """Run `fn`, recording its peak device memory above the level before it started."""
        if not self.available:
            return fn()
        with _Sampler(self.used_mib, 0.002) as sampler:
            result = fn()
        self.peak_mib = sampler.peak - sampler.baseline
        return result
