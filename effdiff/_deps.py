"""Lazy imports of heavy optional dependencies, with an error that names the pip extra."""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> extra that provides it
_EXTRAS = {
    "onnxruntime": "cpu",
    "torch": "export",
    "diffusers": "export",
    "transformers": "export",
    "onnx": "export",
    "onnxscript": "export",
    "safetensors": "export",
    "coremltools": "coreml",
    "tensorrt": "trt",
    "polygraphy": "trt",
    "sklearn": "coreml",
    "pynvml": "gpu",
    "deepcache": "dev",
    "matplotlib": "bench",
    "torchmetrics": "bench",
    "ray": "distributed",
}


class MissingDependency(ImportError):
    pass


def require(module: str) -> ModuleType:
    """Import `module` or raise an ImportError that says which effdiff extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = _EXTRAS.get(top)
        hint = f"pip install 'effdiff[{extra}]'" if extra else f"pip install {top}"
        if top == "onnxruntime":
            hint += " (CPU), or 'effdiff[gpu]' on a CUDA machine"
        raise MissingDependency(f"{module} is needed for this command but is not installed: {hint}") from exc
