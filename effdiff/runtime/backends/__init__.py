"""The backend interface: a `Graph` runs one exported graph; a `Backend` opens graphs of the variants
it understands. The denoising loop sees only these two protocols, so ONNX Runtime, PyTorch, TensorRT
and CoreML plug in beside each other (Polygraphy's runners have the same shape: one `run(feeds)`).

Values a graph returns with `host_outputs=False` may live on the backend's device (an OrtValue on the
GPU, a CUDA tensor); they can be fed to another graph of the same backend without a trip through the
host. `Backend.to_host` brings one back as a numpy array.

Two optional hooks, for backends that need them (the pipeline looks for them; ONNX Runtime has neither):
- `open_source(folder, graph, spec)` and `source_precision(requested)`: the backend builds its graphs from the
  source model folder the manifest names (PyTorch), so no exported file is needed; its variants are
  implied (format "torch").
- `check_variant(variant)`: refuse, with a clear message, a variant this machine cannot run (a TensorRT
  engine built for another TensorRT version or GPU) before its file is opened.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from effdiff.errors import EffdiffError
from effdiff.specs import GraphSpec


@runtime_checkable
class Graph(Protocol):
    """One graph, loaded and ready. `run` checks its feeds against `spec` before the backend sees them."""

    spec: GraphSpec

    def run(self, feeds: Mapping[str, Any], host_outputs: bool = True) -> dict[str, Any]: ...

    def close(self) -> None: ...


class Backend(Protocol):
    """Opens graphs. `formats` are the variant formats it runs ("onnx", "trt", "coreml", "torch")."""

    name: str
    formats: tuple[str, ...]

    def open(self, path: Path, spec: GraphSpec) -> Graph: ...

    def batches_pay(self) -> bool:
        """Whether one decoder call over k steps is cheaper than k calls (GPUs: yes; 2 CPU cores: no)."""
        ...

    def to_host(self, value: Any) -> np.ndarray: ...

    def describe(self) -> str: ...


BackendFactory = Callable[..., Backend]
_REGISTRY: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory) -> None:
    _REGISTRY[name] = factory


def backend_names() -> tuple[str, ...]:
    _register_builtins()
    return tuple(_REGISTRY)


def get_backend(name: str, **options: Any) -> Backend:
    """A backend by name with its options (e.g. providers for ort); EffdiffError listing the choices."""
    _register_builtins()
    if name not in _REGISTRY:
        raise EffdiffError(f"unknown backend {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name](**options)


def first_line(exc: BaseException) -> str:
    """A third-party exception as one line (backends wrap their libraries' errors in EffdiffError)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def builds_from_source(backend: Backend) -> bool:
    """Whether the backend builds graphs from the source model (PyTorch) rather than opening files."""
    return callable(getattr(backend, "open_source", None))


def _lazy(module: str, cls: str) -> BackendFactory:
    """A factory that imports its backend's module only when the backend is asked for."""

    def factory(**options: Any) -> Backend:
        import importlib

        return getattr(importlib.import_module(module), cls)(**options)

    return factory


def _register_builtins() -> None:
    if "ort" not in _REGISTRY:
        from effdiff.runtime.backends.ort import OrtBackend

        register_backend("ort", OrtBackend)
        register_backend("torch", _lazy("effdiff.runtime.backends.torch_backend", "TorchBackend"))
        register_backend("trt", _lazy("effdiff.runtime.backends.trt", "TrtBackend"))
        register_backend("coreml", _lazy("effdiff.runtime.backends.coreml", "CoreMLBackend"))
