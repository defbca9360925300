"""Graphs as the denoising loop uses them: opened lazily through loaders, kept or released by a
loading policy, timed by a wrapper, and seen by a recording wrapper when a hook asks for their feeds.

Lean mode is a policy (`resident=()`: nothing stays open between phases), not a branch in the loop;
a memory plan chooses which graphs stay resident the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from effdiff.runtime.backends import Graph
from effdiff.specs import GRAPHS, GraphSpec

GraphLoader = Callable[[], Graph]
FeedsCallback = Callable[[str, Mapping[str, np.ndarray]], None]


class GraphWrapper:
    """A graph seen through another: same spec, closing closes the wrapped one."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.spec: GraphSpec = graph.spec

    def run(self, feeds: Mapping[str, Any], host_outputs: bool = True) -> dict[str, Any]:
        return self.graph.run(feeds, host_outputs)

    def close(self) -> None:
        self.graph.close()

    def end_phase(self) -> None:
        """The phase that used this graph is over and it stays open: a backend that can give back what
        its runs hold between calls (ONNX Runtime's shared arena) does so now."""
        end = getattr(self.graph, "end_phase", None)
        if end is not None:
            end()


class TimedGraph(GraphWrapper):
    """A graph that accumulates its run time and call count."""

    def __init__(self, graph: Graph) -> None:
        super().__init__(graph)
        self.seconds = 0.0
        self.calls = 0

    def run(self, feeds: Mapping[str, Any], host_outputs: bool = True) -> dict[str, Any]:
        start = time.perf_counter()
        out = self.graph.run(feeds, host_outputs)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


class RecordingGraph(GraphWrapper):
    """Calls `on_feeds(graph name, feeds as host arrays)` before every run (INT8 calibration capture)."""

    def __init__(self, graph: Any, on_feeds: FeedsCallback, to_host: Callable[[Any], np.ndarray]) -> None:
        super().__init__(graph)
        self._on_feeds = on_feeds
        self._to_host = to_host

    def run(self, feeds: Mapping[str, Any], host_outputs: bool = True) -> dict[str, Any]:
        self._on_feeds(self.spec.name, {n: self._to_host(v) for n, v in feeds.items()})
        return self.graph.run(feeds, host_outputs)


class RowSplitGraph(GraphWrapper):
    """Runs a graph on at most `max_rows` batch rows per call and joins the outputs on the host. With
    classifier-free guidance the UNet's two rows (unconditional, conditional) then run one after the
    other, which halves its activation peak, the largest single allocation of a lean 512x512 run, at
    the cost of smaller matrix products. A call whose inputs differ in row count (the decoder's
    multi-step groups: features for `rows`, timesteps for `steps x rows`) runs whole."""

    def __init__(self, graph: Any, max_rows: int, to_host: Callable[[Any], np.ndarray]) -> None:
        super().__init__(graph)
        self.max_rows = max_rows
        self._to_host = to_host

    def run(self, feeds: Mapping[str, Any], host_outputs: bool = True) -> dict[str, Any]:
        sizes = {_leading_dim(v) for v in feeds.values()}
        rows = sizes.pop() if len(sizes) == 1 else 0
        if rows <= self.max_rows:
            return self.graph.run(feeds, host_outputs)
        host = {n: self._to_host(v) for n, v in feeds.items()}  # copied only when split
        parts = [
            self.graph.run({n: v[i : i + self.max_rows] for n, v in host.items()}, True)
            for i in range(0, rows, self.max_rows)
        ]
        return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}


class PerCallGraph:
    """Opens its graph for each run and drops it after, so between calls it holds nothing: the UNet's
    encoder and decoder then never hold their weights at once. Pays where sessions open in milliseconds:
    weights memory-mapped and kept as stored (the `fp32-w16` variants with lean options open in 0.06 s
    on the SD1.5 architecture). Outputs come back on the host: nothing of a session outlives it. A
    backend whose graphs can `unload` (ONNX Runtime) keeps its shared arena between calls; closing this
    graph, when its phase ends, gives that back too."""

    def __init__(self, loader: GraphLoader, spec: GraphSpec) -> None:
        self._loader = loader
        self.spec = spec
        self.load_seconds = 0.0
        self._last: Graph | None = None

    def run(self, feeds: Mapping[str, Any], host_outputs: bool = True) -> dict[str, Any]:
        start = time.perf_counter()
        graph = self._last = self._loader()
        self.load_seconds += time.perf_counter() - start
        try:
            return graph.run(feeds, True)
        finally:
            getattr(graph, "unload", graph.close)()
            give_back_freed_memory()

    def close(self) -> None:
        if self._last is not None:
            self._last.close()
            self._last = None


def _leading_dim(value: Any) -> int:
    """Rows of a feed: numpy and torch arrays have `.shape`, an OrtValue a `.shape()` method; -1 for a
    scalar."""
    shape = value.shape() if callable(getattr(value, "shape", None)) else value.shape
    return int(shape[0]) if len(shape) else -1


@dataclass
class Usage:
    """What one generation spent per graph: run seconds and calls, and seconds spent opening graphs."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(GRAPHS, 0.0))
    calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GRAPHS, 0))
    load_seconds: float = 0.0


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc; musl has none
    except (OSError, AttributeError):
        return None


def give_back_freed_memory() -> bool:
    """Return heap pages that are free but still held by the process to the OS (glibc's malloc_trim).
    Creating an ONNX Runtime session parses the model through buffers it frees again, and glibc keeps
    those pages: 0.17 GiB after the SD1.5 decoder's INT8 session (0.57 GiB held for 0.55 GiB of
    weights after the trim, 0.75 before), which the run's large allocations (mmap) never reuse.
    False where there is nothing to call (not glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class GraphSet:
    """Opens graphs on first use through their loaders; keeps the `resident` ones open afterwards and
    releases the others when the phase that used them ends."""

    def __init__(
        self,
        loaders: Mapping[str, GraphLoader],
        resident: tuple[str, ...] | None = None,
        specs: Mapping[str, GraphSpec] | None = None,
    ) -> None:
        self.loaders = dict(loaders)
        self.resident = tuple(self.loaders) if resident is None else tuple(resident)
        self.specs = dict(specs or {})
        # graphs opened for each call (PerCallGraph; they need a spec) instead of once per phase
        self.per_call: tuple[str, ...] = ()
        self._open: dict[str, TimedGraph] = {}
        self.load_seconds: dict[str, float] = {}

    @property
    def open_names(self) -> tuple[str, ...]:
        return tuple(self._open)

    def open(self, name: str) -> TimedGraph:
        """Open a graph now (or return it), e.g. so its load time stays out of a timed run."""
        if name not in self._open:
            start = time.perf_counter()
            self._open[name] = TimedGraph(self.loaders[name]())
            give_back_freed_memory()
            self.load_seconds[name] = time.perf_counter() - start
        return self._open[name]

    def release(self, name: str) -> None:
        graph = self._open.pop(name, None)
        if graph is not None:
            graph.close()
            del graph
            gc.collect()
            give_back_freed_memory()

    @contextlib.contextmanager
    def using(self, names: tuple[str, ...], usage: Usage) -> Iterator[dict[str, TimedGraph]]:
        """The graphs one phase needs; what this phase opened and is not resident is released after."""
        graphs: dict[str, TimedGraph] = {}
        per_call = {
            n: PerCallGraph(self.loaders[n], self.specs[n])
            for n in names
            if n in self.per_call and n in self.specs
        }
        for name in names:
            if name in per_call:
                self.release(name)  # open from an earlier plan
                graphs[name] = TimedGraph(per_call[name])
                continue
            fresh = name not in self._open
            graphs[name] = self.open(name)
            if fresh:
                usage.load_seconds += self.load_seconds[name]
        before = {n: (g.seconds, g.calls) for n, g in graphs.items()}
        try:
            yield graphs
        finally:
            for name, graph in graphs.items():
                loads = per_call[name].load_seconds if name in per_call else 0.0
                usage.seconds[name] += graph.seconds - before[name][0] - loads
                usage.calls[name] += graph.calls - before[name][1]
                usage.load_seconds += loads
            for pc in per_call.values():
                pc.close()
            graphs.clear()
            for name in names:
                if name in per_call:
                    continue
                if name not in self.resident:
                    self.release(name)
                elif name in self._open:
                    self._open[name].end_phase()
