"""CoreML backend: the `.mlpackage`s of `effdiff-export coreml`, run with coremltools on macOS.

Prediction needs macOS (CoreML is an Apple framework): elsewhere the backend refuses in one line.
Feeds are cast to what the package declares (token ids as int32, CoreML has no int64 inputs) and
outputs come back as numpy arrays; CoreML keeps no values on a device between calls, so
`host_outputs=False` changes nothing. `palettized=N` runs the `coreml-fp16-palN` packages.

torch-free; coremltools is imported when the backend is first used.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from effdiff._deps import MissingDependency, require
from effdiff.errors import EffdiffError
from effdiff.runtime.backends import first_line
from effdiff.specs import GraphSpec

COREML_NEEDED = (
    "CoreML prediction needs macOS 14 (or iOS 17) with coremltools: pip install 'effdiff[coreml]' there"
)


class CoreMLGraph:
    def __init__(self, path: Path, spec: GraphSpec, compute_units: str) -> None:
        ct = require("coremltools")
        self.spec = spec
        self.path = Path(path)
        try:
            self.model = ct.models.MLModel(
                str(self.path), compute_units=getattr(ct.ComputeUnit, compute_units)
            )
        except Exception as exc:
            raise EffdiffError(f"cannot load {self.path}: {first_line(exc)}") from exc
        declared = self.model.get_spec().description.input
        types = {v: k for k, v in ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.items()}
        self.input_dtypes = {
            i.name: np.dtype(types[i.type.multiArrayType.dataType].lower()) for i in declared
        }

    def run(self, feeds: Mapping[str, Any], host_outputs: bool = True) -> dict[str, Any]:
        self.spec.check_inputs(feeds)
        feed = {n: np.asarray(feeds[n]).astype(self.input_dtypes[n]) for n in self.spec.input_names}
        try:
            out = self.model.predict(feed)
        except Exception as exc:
            raise EffdiffError(f"{self.spec.name} failed in CoreML: {first_line(exc)}") from exc
        return {t.name: np.asarray(out[t.name]).astype(t.dtype) for t in self.spec.outputs}

    def close(self) -> None:
        self.model = None


class CoreMLBackend:
    """compute_units: ALL (default: Neural Engine, GPU and CPU), CPU_AND_GPU, CPU_AND_NE, CPU_ONLY."""

    name = "coreml"
    formats = ("coreml",)

    def __init__(self, compute_units: str = "ALL", palettized: int | None = None) -> None:
        if platform.system() != "Darwin":
            raise EffdiffError(f"{COREML_NEEDED}; this machine runs {platform.system()}")
        try:
            ct = require("coremltools")
        except MissingDependency as exc:
            raise MissingDependency(COREML_NEEDED) from exc
        if not hasattr(ct.ComputeUnit, compute_units):
            raise EffdiffError(
                f"unknown compute units {compute_units!r}; use ALL, CPU_AND_GPU, CPU_AND_NE, CPU_ONLY"
            )
        self.compute_units = compute_units
        self.variant_tag = f"pal{palettized}" if palettized else ""

    def open(self, path: Path, spec: GraphSpec) -> CoreMLGraph:
        return CoreMLGraph(path, spec, self.compute_units)

    def batches_pay(self) -> bool:
        return False  # the UNet packages have a fixed batch: one step per decoder call

    def to_host(self, value: Any) -> np.ndarray:
        return np.asarray(value)

    def describe(self) -> str:
        ct = require("coremltools")
        return f"coremltools {ct.__version__} ({self.compute_units}) on {platform.platform()}"
