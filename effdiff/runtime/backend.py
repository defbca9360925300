"""ONNX Runtime sessions that check their inputs against the graph spec before running."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from effdiff.errors import EffdiffError
from effdiff.specs import GraphSpec


def default_providers() -> list[str]:
    """CUDA first when onnxruntime-gpu provides it, CPU always last."""
    available = ort.get_available_providers()
    preferred = [p for p in ("CUDAExecutionProvider",) if p in available]
    return [*preferred, "CPUExecutionProvider"]


class OrtGraph:
    """One exported graph in an onnxruntime session; accumulates its own run time."""

    def __init__(
        self, path: Path, spec: GraphSpec, providers: list[str] | None = None, threads: int | None = None
    ) -> None:
        self.spec = spec
        self.path = Path(path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # keep ORT's own warnings off the user's terminal
        if threads:
            opts.intra_op_num_threads = threads
        start = time.perf_counter()
        try:
            self.session = ort.InferenceSession(
                str(self.path), opts, providers=providers or default_providers()
            )
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EffdiffError(f"cannot load {self.path}: {msg}") from exc
        self.load_seconds = time.perf_counter() - start
        self.run_seconds = 0.0
        self.calls = 0
        names = [i.name for i in self.session.get_inputs()]
        if names != spec.input_names:
            raise EffdiffError(f"{self.path} has inputs {names}, its spec says {spec.input_names}; re-export")

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.spec.check_inputs(feeds)
        start = time.perf_counter()
        outs = self.session.run(None, {n: feeds[n] for n in self.spec.input_names})
        self.run_seconds += time.perf_counter() - start
        self.calls += 1
        return dict(zip(self.spec.output_names, outs, strict=True))
