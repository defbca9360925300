"""Memory samplers: host RSS, and device memory through NVML or, on Jetson, the shared system pool; and
how much CPU other processes took while a measurement ran.

Measuring is opt-in: the runtime starts a sampler only when its caller asks for memory figures
(`effdiff generate` prints peak RSS; the bench harness wraps timed runs), never on its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil


def is_jetson() -> bool:
    return Path("/etc/nv_tegra_release").exists()


class _Sampler:
    """Samples `read()` every `interval_s` in a background thread between __enter__ and __exit__."""

    def __init__(self, read: Callable[[], float], interval_s: float, timeline: bool = False) -> None:
        self._read = read
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.baseline = 0.0
        self.peak = 0.0
        # (time.perf_counter(), value) of every sample when asked for
        self.samples: list[tuple[float, float]] | None = [] if timeline else None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            value = self._read()
            self.peak = max(self.peak, value)
            if self.samples is not None:
                self.samples.append((time.perf_counter(), value))

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

    def __init__(self, interval_s: float = 0.005, timeline: bool = False) -> None:
        proc = psutil.Process()
        super().__init__(lambda: float(proc.memory_info().rss), interval_s, timeline)

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


class OtherProcessesCpu:
    """Context manager: `share`, the fraction of the machine's CPU time that other processes used while
    the block ran (0 on an idle machine, 1 when they took every core).

    The load average cannot tell this: a benchmark that runs ONNX Runtime on every core raises the load
    to the core count by itself. Busy time of the whole machine minus this process's own (children
    included) can, and it matters because PyTorch peers slow down about 3x under contention against
    ONNX Runtime's 2x, so ratios from a busy machine flatter effdiff.
    """

    share: float = 0.0

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        # guest time is already inside user time on Linux; iowait is idle for this purpose
        return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))

    def _own(self) -> float:
        t = self._proc.cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self) -> OtherProcessesCpu:
        self._proc = psutil.Process()
        self._start = (time.perf_counter(), self._busy(), self._own())
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        wall, busy, own = self._start
        wall = time.perf_counter() - wall
        capacity = wall * (psutil.cpu_count() or 1)
        others = (self._busy() - busy) - (self._own() - own)
        self.share = min(1.0, max(0.0, others / capacity)) if capacity > 0 else 0.0
