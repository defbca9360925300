"""The split graphs -> CoreML packages (`.mlpackage`, ML program), converted with coremltools from
`torch.export` programs of the same split modules the ONNX export traces, built from the source model.

Which shapes are flexible is what coremltools 9's `torch.export` path converts:
- text encoder: flexible batch (a `RangeDim`);
- UNet encoder, decoder and VAE decoder: flexible latent height and width (`RangeDim`s, multiples of
  the UNet factor), fixed batch. A symbolic batch fails in its group-norm lowering ("Cannot add const
  [is0, ...]"), and the decoder's `rows` (steps x batch) with it, so the decoder decodes one step per
  call at that batch (2 = one image with classifier-free guidance, by default).
Flexible (range) shapes run on the GPU and CPU; the Neural Engine needs fixed or enumerated shapes.

`palettize` adds a weight-palettized package beside each fp16 one (`coremltools.optimize.coreml`,
k-means lookup tables of 2^bits entries), from the same conversion. A package is a folder: every file
in it is recorded with its size and sha256. Conversion runs on Linux; prediction needs macOS.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from effdiff._deps import require
from effdiff.artifacts import (
    FileRecord,
    Manifest,
    Variant,
    folder_lock,
    mark_verified,
    remove_stale_temporaries,
    variant_file,
    variant_name,
)
from effdiff.errors import EffdiffError
from effdiff.specs import GraphSpec, Precision

COREML_GRAPHS = ("text_encoder", "unet_encoder", "unet_decoder", "vae_decoder")
PALETTE_BITS = (8, 6, 4)
MAX_TEXT_BATCH = 16


@dataclass(frozen=True)
class CoreMLRecipe:
    precision: Precision = Precision.FP16
    palettize: int | None = None  # also write a package with 2^bits-entry weight palettes
    palette_mode: str = "kmeans"  # coremltools' "kmeans" (needs scikit-learn) or "uniform"
    batch: int = 2  # fixed batch of the UNet graphs and the VAE: 2 rows = one image with CFG
    graphs: tuple[str, ...] = COREML_GRAPHS

    def check(self) -> None:
        if self.precision is not Precision.FP16:
            raise EffdiffError("CoreML packages are converted at fp16 (the Neural Engine's precision)")
        if self.palettize is not None and self.palettize not in PALETTE_BITS:
            raise EffdiffError(f"--palettize must be one of {', '.join(map(str, PALETTE_BITS))}")
        if self.palette_mode not in ("kmeans", "uniform"):
            raise EffdiffError(f"palette mode must be kmeans or uniform, not {self.palette_mode!r}")
        if self.batch < 1:
            raise EffdiffError(f"batch must be >= 1, got {self.batch}")
        unknown = [g for g in self.graphs if g not in COREML_GRAPHS]
        if unknown or not self.graphs:
            raise EffdiffError(f"CoreML graphs are {', '.join(COREML_GRAPHS)}; got {', '.join(unknown)}")


@dataclass
class PackageResult:
    graph: str
    variant: str
    seconds: float
    size_mib: float
    inputs: dict[str, list[Any]] = field(default_factory=dict)  # name -> [dtype, shape, flexibility]


@dataclass
class CoreMLReport:
    artifacts: Path
    results: list[PackageResult]

    def table(self) -> str:
        lines = [f"{'graph':<14} {'variant':<18} {'s':>6} {'MiB':>9}  inputs", "-" * 78]
        for r in self.results:
            ins = "; ".join(f"{n} {d} {s}{' ' + f if f else ''}" for n, (d, s, f) in r.inputs.items())
            lines.append(f"{r.graph:<14} {r.variant:<18} {r.seconds:>6.1f} {r.size_mib:>9.2f}  {ins}")
        sizes: dict[str, float] = {}
        for r in self.results:
            kind = f"{r.variant.split('-pal')[1]}-bit palettized" if "-pal" in r.variant else "fp16"
            sizes[kind] = sizes.get(kind, 0.0) + r.size_mib
        lines.append("total MiB: " + ", ".join(f"{kind} {mib:.2f}" for kind, mib in sizes.items()))
        return "\n".join(lines)


def _coremltools() -> Any:
    """coremltools, imported without its import-time notices on the user's terminal (an untested-torch
    warning, and on Linux one line per macOS-only proxy it cannot load)."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return require("coremltools")


def _dynamic_shapes(spec: GraphSpec, manifest: Manifest, graph: str) -> tuple[Any, ...]:
    """torch.export dynamic shapes for the axes CoreML can keep flexible (see the module docstring)."""
    torch = require("torch")
    dim = torch.export.Dim
    if graph == "text_encoder":
        return ({0: dim("batch", min=1, max=MAX_TEXT_BATCH)},)
    f = manifest.geometry.unet_factor
    lat_h, lat_w = manifest.export_size
    # latent sizes from one UNet factor up to twice the export size, in steps of the factor
    h = dim("h", min=1, max=max(2, 2 * lat_h // f))
    w = dim("w", min=1, max=max(2, 2 * lat_w // f))
    shapes = []
    for t in spec.inputs:
        axes: dict[int, Any] = {}
        for i, axis in enumerate(t.axes):
            if axis.base in ("height", "width"):
                axes[i] = (h if axis.base == "height" else w) * (f * axis.mul // axis.div)
        shapes.append(axes or None)
    if graph == "unet_decoder":  # forward(timestep, encoder_hidden_states, mid, *skips)
        return (*shapes[:3], tuple(shapes[3:]))
    return tuple(shapes)


def _example_args(spec: GraphSpec, manifest: Manifest, batch: int) -> list[Any]:
    torch = require("torch")
    lat_h, lat_w = manifest.export_size
    rng = np.random.default_rng(0)
    feeds = spec.sample_inputs(batch, lat_h, lat_w, rng, timesteps=np.full(batch, 501.0))
    return [torch.from_numpy(feeds[n]) for n in spec.input_names]


def _drop_aliases(program: Any) -> Any:
    """Replace `aten.alias` nodes by their input: coremltools 9 fails on them ("Unsupported fx node
    alias"); CLIP's `position_ids[:, :seq_len]` at the full length exports as one."""
    torch = require("torch")
    graph = program.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph.lint()
    program.graph_module.recompile()
    return program


def _io_type(ct: Any, dtype: str) -> Any:
    return ct.TensorType(dtype=np.float16 if dtype == "float16" else np.dtype(dtype).type)


def convert_graph(module: Any, spec: GraphSpec, manifest: Manifest, graph: str, batch: int) -> Any:
    """One split module -> an ML program whose inputs and outputs carry the spec's names; float
    inputs and outputs are fp16 as in the fp16 spec, timesteps float32, token ids int32 (CoreML has
    no int64 inputs)."""
    torch = require("torch")
    ct = _coremltools()
    args = _example_args(manifest.specs(Precision.FP32)[graph], manifest, batch)  # the module is fp32
    # coremltools prints a progress bar per pass with no switch to turn them off; ours says what happens
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.export.export(
            module, tuple(args), dynamic_shapes=_dynamic_shapes(spec, manifest, graph)
        )
        program = _drop_aliases(program.run_decompositions({}))
        inputs = [_io_type(ct, "int32" if t.dtype == "int64" else t.dtype) for t in spec.inputs]
        outputs = [_io_type(ct, t.dtype) for t in spec.outputs]
        mlmodel = ct.convert(
            program,
            inputs=inputs,
            outputs=outputs,
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS17,
            compute_precision=ct.precision.FLOAT16,
        )
    model_spec = mlmodel.get_spec()
    names = [(i.name, want) for i, want in zip(model_spec.description.input, spec.input_names, strict=True)]
    names += [
        (o.name, want) for o, want in zip(model_spec.description.output, spec.output_names, strict=True)
    ]
    for old, new in names:
        if old != new:
            ct.utils.rename_feature(model_spec, old, new)
    return ct.models.MLModel(model_spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)


def palettize(mlmodel: Any, bits: int, mode: str) -> Any:
    ct = _coremltools()
    if mode == "kmeans":
        require("sklearn")  # coremltools clusters with scikit-learn; name the extra before it fails
    opt = ct.optimize.coreml
    config = opt.OptimizationConfig(global_config=opt.OpPalettizerConfig(nbits=bits, mode=mode))
    with contextlib.redirect_stderr(io.StringIO()):
        return opt.palettize_weights(mlmodel, config)


def describe_inputs(mlmodel: Any) -> dict[str, list[Any]]:
    """name -> [dtype, shape, flexibility] of a model's inputs, read from its spec."""
    ct = _coremltools()
    types = {v: k for k, v in ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.items()}
    out = {}
    for i in mlmodel.get_spec().description.input:
        arr = i.type.multiArrayType
        flex = arr.WhichOneof("ShapeFlexibility")
        shape: list[Any] = list(arr.shape)
        if flex == "shapeRange":
            shape = [
                r.lowerBound if r.lowerBound == r.upperBound else f"{r.lowerBound}..{r.upperBound}"
                for r in arr.shapeRange.sizeRanges
            ]
        out[i.name] = [types.get(arr.dataType, str(arr.dataType)).lower(), shape, flex or ""]
    return out


def _save_package(mlmodel: Any, artifacts: Path, name: str) -> dict[str, FileRecord]:
    """Save into a temporary folder, then swap it into place (the old package, if any, goes last)."""
    tmp = artifacts / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        mlmodel.save(str(tmp / name))
        final = artifacts / name
        trash = artifacts / f".tmp-old-{name}-{os.getpid()}"
        if final.exists():
            os.replace(final, trash)
        os.replace(tmp / name, final)
        shutil.rmtree(trash, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    records = {
        str(p.relative_to(artifacts)): FileRecord.of(p) for p in sorted(final.rglob("*")) if p.is_file()
    }
    mark_verified(artifacts, records)
    return records


def export_coreml(
    artifacts: Path,
    recipe: CoreMLRecipe | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> CoreMLReport:
    """Convert the recipe's graphs from the manifest's source model into `artifacts`, recording each
    package as a variant (`coreml-fp16`, and `coreml-fp16-palN` with `palettize`)."""
    recipe = recipe or CoreMLRecipe()
    recipe.check()
    log = log or (lambda _msg: None)
    artifacts = Path(artifacts)
    manifest = Manifest.read(artifacts)
    source = Path(manifest.source.path)
    if not source.is_dir():
        raise EffdiffError(f"the source model {source} named in the manifest is not there; re-export")
    ct = _coremltools()
    from effdiff.runtime.backends.torch_modules import SPLIT_MODULES, load_pretrained, split_module

    for name in ("coremltools", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)
    specs = manifest.specs(recipe.precision)
    results = []
    loaded: dict[str, Any] = {}
    with folder_lock(artifacts, "a CoreML conversion"):
        remove_stale_temporaries(artifacts)
        bar = tqdm(recipe.graphs, desc="coreml", unit="graph", disable=not progress)
        for graph in bar:
            bar.set_postfix_str(graph)
            component = SPLIT_MODULES[graph][0]
            if component not in loaded:
                loaded.clear()
                gc.collect()
                loaded[component] = load_pretrained(source, component)
            start = time.perf_counter()
            batch = recipe.batch
            mlmodel = convert_graph(
                split_module(graph, loaded[component]), specs[graph], manifest, graph, batch
            )
            packages = [(variant_name(recipe.precision, "coreml"), mlmodel)]
            if recipe.palettize is not None:
                packages.append((f"{packages[0][0]}-pal{recipe.palettize}", None))
            for name, model in packages:
                if model is None:
                    model = palettize(mlmodel, recipe.palettize or 8, recipe.palette_mode)
                file = variant_file(graph, name, ".mlpackage")
                records = _save_package(model, artifacts, file)
                seconds = time.perf_counter() - start
                inputs = describe_inputs(model)
                manifest.graphs.setdefault(graph, {})[name] = Variant(
                    name=name,
                    precision=recipe.precision,
                    file=file,
                    files=records,
                    format="coreml",
                    stats={"seconds": round(seconds, 2)},
                    meta={
                        "coremltools": ct.__version__,
                        "deployment_target": "iOS17 / macOS14",
                        "palettize_bits": recipe.palettize if "-pal" in name else None,
                        "palette_mode": recipe.palette_mode if "-pal" in name else None,
                        "inputs": inputs,
                        "prediction_checked": False,  # needs macOS: see tests marked `macos`
                    },
                )
                manifest.write(artifacts)
                size = sum(r.size for r in records.values()) / 2**20
                results.append(PackageResult(graph, name, seconds, size, inputs))
                log(f"{graph}: {name} in {seconds:.1f} s, {size:.2f} MiB")
            del mlmodel
            gc.collect()
    return CoreMLReport(artifacts, results)
