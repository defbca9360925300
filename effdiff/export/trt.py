"""ONNX graphs -> TensorRT engines through Polygraphy's loaders: one engine per graph, recorded in the
manifest as a variant (`trt-fp16`, `trt-int8`) with the TensorRT version and GPU it is tied to.

Optimization profiles come from each graph's `GraphSpec.shape_ranges`, so engine shapes and the
runtime's input checks cannot disagree: batch 1..max_batch (2 rows per guided image), latent sizes
from half the export size up to it, and the decoder's `rows` up to decoder_steps x max_batch so one call
can decode several steps that share a key step's features (parallel decoding).

fp16 engines are built from the fp32 ONNX graph with fp16 kernels allowed, their float inputs and
outputs set to fp16 (the fp16 spec). INT8 engines are built from the QDQ graphs `effdiff-export int8`
writes (explicit quantization: TensorRT takes the scales from the graph, no calibrator); the text
encoder and VAE have no INT8 form and get fp16 engines beside them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from effdiff import __version__
from effdiff._deps import require
from effdiff.artifacts import (
    FileRecord,
    Manifest,
    Variant,
    atomic_path,
    check_files,
    check_writable_file,
    folder_lock,
    mark_verified,
    remove_stale_temporaries,
    variant_file,
    variant_name,
)
from effdiff.compare import Comparison, compare_outputs, worst_table
from effdiff.errors import EffdiffError
from effdiff.runtime.backends.trt import (
    LAYERNORM_MIN_TRT,
    EngineTarget,
    current_target,
    polygraphy_trt,
    tensorrt,
    version_tuple,
)
from effdiff.specs import GRAPHS, UNET_GRAPHS, GraphSpec, Precision

ENGINE_PRECISIONS = (Precision.FP16, Precision.INT8)
# Relative L2 of an engine's outputs against the ONNX graph it was built from (ONNX Runtime, CPU).
ENGINE_TOLERANCE = {Precision.FP16: 1e-2, Precision.INT8: 1e-1}


@dataclass(frozen=True)
class EngineRecipe:
    precision: Precision = Precision.FP16
    max_batch: int = 2  # largest feature batch: 2 rows per image with classifier-free guidance
    decoder_steps: int = 8  # steps one decoder call may decode: the runtime's GPU default batch
    timing_cache: Path | None = None

    def check(self) -> None:
        if self.precision not in ENGINE_PRECISIONS:
            raise EffdiffError(f"TensorRT engines are built at fp16 or int8, not {self.precision.value}")
        if self.max_batch < 1 or self.decoder_steps < 1:
            raise EffdiffError("--max-batch and the decoder steps per call must be >= 1")
        if self.timing_cache is not None:
            check_writable_file(self.timing_cache)


@dataclass(frozen=True)
class ShapeProfile:
    """(min, opt, max) shape of every input of one graph: one TensorRT optimization profile."""

    graph: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def to_json(self) -> dict[str, list[list[int]]]:
        return {n: [list(s) for s in mom] for n, mom in self.shapes.items()}


def engine_profile(manifest: Manifest, spec: GraphSpec, recipe: EngineRecipe) -> ShapeProfile:
    """Latent sizes from half the export size (at least one UNet factor) up to it, batch 1..max_batch
    (opt: one guided image), and for the decoder rows up to decoder_steps x max_batch (opt: the full
    decoder_steps at the opt batch, the calls parallel decoding makes most)."""
    f = manifest.geometry.unet_factor
    lat_h, lat_w = manifest.export_size
    low = (max(f, lat_h // 2 // f * f), max(f, lat_w // 2 // f * f))
    opt_batch = min(2, recipe.max_batch)
    steps = recipe.decoder_steps if spec.has_rows else 1
    shapes = spec.shape_ranges((1, *low), (opt_batch, lat_h, lat_w), (recipe.max_batch, lat_h, lat_w), steps)
    if spec.has_rows:
        opt = spec.input_shapes(opt_batch, lat_h, lat_w, steps)
        shapes = {n: (lo, opt[n], hi) for n, (lo, _, hi) in shapes.items()}
    return ShapeProfile(spec.name, shapes)


def layernorm_nodes(onnx_path: Path) -> int:
    """LayerNormalization nodes in an ONNX graph and its local functions (weights are not loaded)."""
    onnx = require("onnx")
    model = onnx.load(str(onnx_path), load_external_data=False)
    nodes = [*model.graph.node, *(n for fn in model.functions for n in fn.node)]
    return sum(n.op_type == "LayerNormalization" for n in nodes)


def check_parser_support(trt_version: str, onnx_path: Path) -> None:
    """TensorRT before 8.6 (JetPack 5 ships 8.5) cannot parse LayerNormalization, which every CLIP text
    encoder and UNet transformer block exports as: refuse before a long build fails inside the parser."""
    if version_tuple(trt_version)[:2] >= LAYERNORM_MIN_TRT:
        return
    count = layernorm_nodes(onnx_path)
    if count:
        raise EffdiffError(
            f"TensorRT {trt_version} cannot parse LayerNormalization ({count} nodes in {onnx_path.name}); "
            "JetPack 5 ships TensorRT 8.5: use JetPack 6 (TensorRT >= 8.6; effdiff's `trt` extra needs 10)"
        )


def source_variants(manifest: Manifest, precision: Precision) -> dict[str, Variant]:
    """The ONNX variant each engine is built from: int8 for the UNet graphs of an INT8 build (refused,
    naming the command, when absent), else fp32 (fp16 for an fp16-only export)."""
    out = {}
    for graph in GRAPHS:
        if precision is Precision.INT8 and graph in UNET_GRAPHS:
            out[graph] = manifest.variant(graph, Precision.INT8.value)
        else:
            out[graph] = manifest.find(graph, Precision.FP32) or manifest.choose(graph, Precision.FP16)
    return out


def engine_precision(graph: str, precision: Precision) -> Precision:
    return precision if graph in UNET_GRAPHS else Precision.FP16


@dataclass
class EngineResult:
    graph: str
    variant: str
    skipped: bool
    seconds: float = 0.0
    size_mib: float = 0.0
    comparisons: list[Comparison] = field(default_factory=list)


@dataclass
class EngineReport:
    artifacts: Path
    target: EngineTarget
    results: list[EngineResult]

    def table(self) -> str:
        lines = [f"{'graph':<14} {'variant':<10} {'build s':>8} {'MiB':>8}  note", "-" * 56]
        for r in self.results:
            note = "kept (same recipe)" if r.skipped else "built"
            lines.append(f"{r.graph:<14} {r.variant:<10} {r.seconds:>8.1f} {r.size_mib:>8.1f}  {note}")
        comps = [c for r in self.results for c in r.comparisons]
        return "\n".join([*lines, "", *worst_table(comps)]) if comps else "\n".join(lines)


def _recipe_key(source: Variant, spec_file: str, profile: ShapeProfile, target: EngineTarget, p: str) -> str:
    payload = {
        "source": source.files[spec_file].sha256,
        "profile": profile.to_json(),
        "target": target.to_meta(),
        "precision": p,
        "effdiff": __version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _build_engine(
    onnx_path: Path, spec: GraphSpec, profile: ShapeProfile, precision: Precision, recipe: EngineRecipe
) -> Any:
    """Polygraphy's loaders, lazily chained: parse, set fp16 I/O per the spec, configure, build."""
    trt = tensorrt()
    pg = polygraphy_trt()
    network: Any = pg.NetworkFromOnnxPath(str(onnx_path))
    half = {t.name: trt.float16 for t in (*spec.inputs, *spec.outputs) if t.dtype == "float16"}
    if half:
        network = pg.SetTensorDatatypes(network, half)
    trt_profile = pg.Profile()
    for name, (low, opt, high) in profile.shapes.items():
        trt_profile.add(name, min=low, opt=opt, max=high)
    cache = recipe.timing_cache
    config = pg.CreateConfig(
        fp16=True,
        int8=precision is Precision.INT8,
        profiles=[trt_profile],
        load_timing_cache=str(cache) if cache is not None and cache.exists() else None,
    )
    return pg.EngineFromNetwork(network, config, save_timing_cache=str(cache) if cache else None)()


def _validate_engine(
    engine: Any, onnx_path: Path, onnx_spec: GraphSpec, spec: GraphSpec, profile: ShapeProfile, p: Precision
) -> list[Comparison]:
    """The engine against the ONNX graph it was built from (ONNX Runtime, CPU), at the profile's opt
    shape, on realistic inputs (latents ~ N(0,1), DDIM timesteps)."""
    from effdiff.runtime.backends.ort import OrtGraph

    pg = polygraphy_trt()
    opt = {n: mom[1] for n, mom in profile.shapes.items()}
    ts = np.resize(np.array([981.0, 501.0, 21.0], np.float32), opt["timestep"]) if "timestep" in opt else None
    rng = np.random.default_rng(0)
    feeds = {}
    for t in spec.inputs:
        if t.name == "input_ids":
            vocab = int(spec.meta.get("vocab_size", 1000))
            feeds[t.name] = rng.integers(0, vocab, size=opt[t.name]).astype(t.dtype)
        else:
            value = ts if t.name == "timestep" else rng.standard_normal(opt[t.name])
            feeds[t.name] = np.asarray(value).astype(t.dtype)
    reference = OrtGraph(onnx_path, onnx_spec, ["CPUExecutionProvider"])
    want = reference.run({t.name: feeds[t.name].astype(t.dtype) for t in onnx_spec.inputs})
    with pg.TrtRunner(engine) as runner:
        got = runner.infer(feeds)
    got = {n: np.asarray(got[n], np.float32) for n in spec.output_names}
    want = {n: np.asarray(v, np.float32) for n, v in want.items()}
    return compare_outputs(spec.name, "opt shape", got, want, ENGINE_TOLERANCE[p])


def build_engines(
    artifacts: Path,
    recipe: EngineRecipe | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> EngineReport:
    """One engine per graph into `artifacts`, recorded in its manifest. Everything that can be checked
    without TensorRT is checked first (the folder, the source variants, the options); then TensorRT's
    presence, and the parser's support for the graphs' operators."""
    recipe = recipe or EngineRecipe()
    log = log or (lambda _msg: None)
    artifacts = Path(artifacts)
    recipe.check()
    manifest = Manifest.read(artifacts)
    if manifest.recipe.get("attention", "standard") != "standard":
        raise EffdiffError(
            f"{artifacts} was exported with --attention {manifest.recipe['attention']} (ONNX Runtime's "
            "MultiHeadAttention), which TensorRT's parser does not read; export with --attention standard "
            "for TensorRT"
        )
    sources = source_variants(manifest, recipe.precision)
    for variant in sources.values():
        check_files(artifacts, variant.files)
    target = current_target()  # one line when TensorRT or its driver is missing
    if target.gpu == "unknown":
        raise EffdiffError(
            f"no NVIDIA GPU found (NVML): TensorRT {target.tensorrt} builds engines for the GPU it runs on"
        )
    for variant in sources.values():
        check_parser_support(target.tensorrt, artifacts / variant.file)
    results = []
    with folder_lock(artifacts, "a TensorRT build"):
        remove_stale_temporaries(artifacts)
        bar = tqdm(GRAPHS, desc="trt", unit="engine", disable=not progress)
        for graph in bar:
            bar.set_postfix_str(graph)
            precision = engine_precision(graph, recipe.precision)
            name = variant_name(precision, "trt")
            spec = manifest.specs(precision)[graph]
            source = sources[graph]
            profile = engine_profile(manifest, spec, recipe)
            key = _recipe_key(source, source.file, profile, target, precision.value)
            file = variant_file(graph, name, ".engine")
            old = manifest.variants(graph).get(name)
            if old is not None and old.recipe_key == key and (artifacts / file).is_file():
                results.append(EngineResult(graph, name, True, size_mib=old.size_bytes / 2**20))
                continue
            start = time.perf_counter()
            engine = _build_engine(artifacts / source.file, spec, profile, precision, recipe)
            with atomic_path(artifacts / file) as tmp:
                tmp.write_bytes(bytes(engine.serialize()))
            record = FileRecord.of(artifacts / file)
            mark_verified(artifacts, {file: record})
            onnx_spec = manifest.spec(graph, source)
            comparisons = _validate_engine(
                engine, artifacts / source.file, onnx_spec, spec, profile, precision
            )
            seconds = time.perf_counter() - start
            manifest.graphs.setdefault(graph, {})[name] = Variant(
                name=name,
                precision=precision,
                file=file,
                files={file: record},
                format="trt",
                validation=comparisons,
                recipe_key=key,
                stats={"seconds": round(seconds, 2)},
                meta={
                    **target.to_meta(),
                    "source_variant": source.name,
                    "source_sha256": source.files[source.file].sha256,
                    "profile": profile.to_json(),
                    "max_batch": recipe.max_batch,
                    "decoder_steps": recipe.decoder_steps,
                },
            )
            manifest.write(artifacts)  # after every engine: an interrupted build resumes from here
            results.append(EngineResult(graph, name, False, seconds, record.size / 2**20, comparisons))
            log(f"{graph}: {name} engine built in {seconds:.1f} s")
    return EngineReport(artifacts, target, results)
