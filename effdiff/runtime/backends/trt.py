"""TensorRT backend: engines built by `effdiff-export trt`, run through Polygraphy's `TrtRunner`.

An engine is tied to the TensorRT version and the GPU it was built on. The manifest records both for
every engine variant, and `check_variant` refuses an engine built elsewhere, naming both sides and
the rebuild command, before TensorRT's own deserializer fails with less to say.

With `host_outputs=False` a graph returns Polygraphy `DeviceView`s of its output buffers: the
encoder's features stay on the GPU and are bound as the decoder's inputs. They stay valid until that
engine runs again, which the loop does only after the decoder has used them.

torch-free; TensorRT and Polygraphy are imported when the backend is first used.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from effdiff._deps import MissingDependency, require
from effdiff.errors import EffdiffError
from effdiff.profiling import is_jetson
from effdiff.runtime.backends import first_line
from effdiff.specs import GraphSpec

TRT_NEEDED = (
    "TensorRT engines need TensorRT >= 10 and an NVIDIA GPU with its driver: "
    "pip install 'effdiff[trt]' on such a machine (Jetson: TensorRT comes with JetPack 6)"
)
# TensorRT's ONNX parser reads LayerNormalization from 8.6 on (JetPack 6); JetPack 5 ships 8.5.
LAYERNORM_MIN_TRT = (8, 6)
# Compute capability of Jetson modules, which NVML does not describe.
_JETSON_CC = {"orin": "8.7", "xavier": "7.2", "nano": "5.3", "tx2": "6.2"}


def tensorrt() -> Any:
    """The tensorrt module, or a one-line MissingDependency saying what is needed."""
    try:
        return require("tensorrt")
    except MissingDependency as exc:
        raise MissingDependency(TRT_NEEDED) from exc
    except OSError as exc:  # the bindings are there but libnvinfer / the driver is not
        raise MissingDependency(f"TensorRT is installed but cannot load ({exc}); {TRT_NEEDED}") from exc


def polygraphy_trt() -> Any:
    try:
        require("polygraphy")
    except MissingDependency as exc:
        raise MissingDependency(f"polygraphy is not installed; {TRT_NEEDED}") from exc
    tensorrt()  # Polygraphy imports TensorRT lazily: fail here, with the message above, not inside it
    return require("polygraphy.backend.trt")


def version_tuple(version: str) -> tuple[int, ...]:
    """'10.3.0.26' -> (10, 3, 0, 26); non-numeric parts end it ('8.6.1.post1' -> (8, 6, 1))."""
    out = []
    for part in version.split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        out.append(int(match.group()))
        if match.group() != part:
            break
    return tuple(out)


@dataclass(frozen=True)
class EngineTarget:
    """What an engine is tied to: the TensorRT version and the GPU (name, compute capability)."""

    tensorrt: str
    gpu: str
    compute_capability: str

    def to_meta(self) -> dict[str, str]:
        return {"tensorrt": self.tensorrt, "gpu": self.gpu, "compute_capability": self.compute_capability}


def gpu_identity() -> tuple[str, str]:
    """(name, compute capability) of GPU 0 through NVML; on Jetson from the device tree.
    ("unknown", "unknown") where neither can tell."""
    if is_jetson():
        try:
            model = Path("/proc/device-tree/model").read_text().strip("\x00 \n")
        except OSError:
            model = "Jetson"
        cc = next((v for k, v in _JETSON_CC.items() if k in model.lower()), "unknown")
        return model, cc
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        return (name.decode() if isinstance(name, bytes) else str(name)), f"{major}.{minor}"
    except Exception:  # no NVML library, driver or GPU
        return "unknown", "unknown"


def current_target() -> EngineTarget:
    name, cc = gpu_identity()
    return EngineTarget(tensorrt().__version__, name, cc)


def check_engine_target(meta: Mapping[str, Any], here: EngineTarget, engine: str, precision: str) -> None:
    """EffdiffError when the engine's recorded TensorRT version (major.minor.patch) or GPU differs from
    this machine's. A GPU this machine cannot identify is not held against the engine."""
    built = EngineTarget(
        str(meta.get("tensorrt", "?")), str(meta.get("gpu", "?")), str(meta.get("compute_capability", "?"))
    )
    rebuild = f"rebuild it here with `effdiff-export trt --artifacts DIR --precision {precision}`"
    if version_tuple(built.tensorrt)[:3] != version_tuple(here.tensorrt)[:3]:
        raise EffdiffError(
            f"{engine} was built with TensorRT {built.tensorrt}; this machine has TensorRT "
            f"{here.tensorrt}, which cannot load it: {rebuild}"
        )
    known = here.gpu != "unknown"
    if known and (built.gpu != here.gpu or built.compute_capability != here.compute_capability):
        raise EffdiffError(
            f"{engine} was built for {built.gpu} (compute capability {built.compute_capability}); this "
            f"machine has {here.gpu} (compute capability {here.compute_capability}): {rebuild}"
        )


def _describe(value: Any) -> tuple[np.dtype, tuple[int, ...]]:
    if isinstance(value, np.ndarray):
        return value.dtype, value.shape
    if hasattr(value, "dtype") and hasattr(value, "shape"):  # Polygraphy DeviceView / DeviceArray
        return np.dtype(getattr(value.dtype, "name", value.dtype)), tuple(value.shape)
    arr = np.asarray(value)
    return arr.dtype, arr.shape


class TrtGraph:
    """One engine in a Polygraphy TrtRunner; feeds are checked against the spec and the engine's
    optimization profile before TensorRT sees them."""

    def __init__(self, path: Path, spec: GraphSpec) -> None:
        trt_backend = polygraphy_trt()
        self.spec = spec
        self.path = Path(path)
        try:
            engine = trt_backend.EngineFromBytes(self.path.read_bytes())()
            self.runner = trt_backend.TrtRunner(engine)
            self.runner.activate()
        except Exception as exc:
            raise EffdiffError(f"cannot load engine {self.path}: {first_line(exc)}") from exc
        self.bounds = {
            n: tuple(tuple(s) for s in engine.get_tensor_profile_shape(n, 0)[::2]) for n in spec.input_names
        }

    def _check_profile(self, feeds: Mapping[str, Any]) -> None:
        for name, (low, high) in self.bounds.items():
            shape = _describe(feeds[name])[1]
            if any(s < lo or s > hi for s, lo, hi in zip(shape, low, high, strict=True)):
                raise EffdiffError(
                    f"{self.spec.name}: `{name}` {shape} is outside the engine's profile {low}..{high}; "
                    "rebuild with a larger --max-batch, or lower --max-decoder-batch"
                )

    def run(self, feeds: Mapping[str, Any], host_outputs: bool = True) -> dict[str, Any]:
        self.spec.check_inputs(feeds, _describe)
        self._check_profile(feeds)
        try:
            feed = {n: feeds[n] for n in self.spec.input_names}
            out = self.runner.infer(feed, copy_outputs_to_host=host_outputs)
        except Exception as exc:
            raise EffdiffError(f"{self.spec.name} failed in TensorRT: {first_line(exc)}") from exc
        return {n: out[n] for n in self.spec.output_names}

    def close(self) -> None:
        if getattr(self, "runner", None) is not None:
            self.runner.deactivate()
            self.runner = None


class TrtBackend:
    """TensorRT engines (format "trt"). Decoder batching pays on GPUs, so it batches by default."""

    name = "trt"
    formats = ("trt",)

    def __init__(self) -> None:
        polygraphy_trt()
        self.target = current_target()

    def check_variant(self, variant: Any) -> None:
        check_engine_target(variant.meta, self.target, variant.file, variant.precision.value)

    def open(self, path: Path, spec: GraphSpec) -> TrtGraph:
        return TrtGraph(path, spec)

    def batches_pay(self) -> bool:
        return True

    def to_host(self, value: Any) -> np.ndarray:
        return value if isinstance(value, np.ndarray) else np.asarray(value.numpy())

    def describe(self) -> str:
        return f"TensorRT {self.target.tensorrt} on {self.target.gpu}"
