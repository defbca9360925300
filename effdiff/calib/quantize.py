"""Post-training INT8 of the UNet graphs with onnxruntime.quantization, validated against fp32.

Per UNet graph (unet_encoder, unet_decoder, unet, and DeepCache's unet_deep and unet_shallow when the
folder has them), from its fp32 variant:
1. ONNX Runtime's pre-processing (`quant_pre_process`: optimisation and shape inference; symbolic shape
   inference is skipped, it fails on the decoder), in a private temporary folder.
2. `static`: QDQ with per-channel symmetric int8 weights and symmetric int8 activations, calibrated
   (minmax, percentile or entropy) on what the runtime feeds that graph. Only Conv, MatMul and Gemm
   with a constant weight are quantized, and only their inputs: the pattern TensorRT's explicit
   quantization fuses (`check_qdq` verifies it). `dynamic`: MatMul/Gemm weights only, activations
   quantized at run time: no calibration, meant for CPUs without VNNI.
3. Layers kept in float by name pattern (NVIDIA's diffusion recipe by default: time embedding,
   conv_in, conv_out, shortcut convolutions, output norm), matched against each node's module scope.
4. Validation: relative L2 of each output against the fp32 graph on held-out captured inputs.
The result is written to a temporary folder inside the artifacts folder and renamed into place (data
first, graph last), then recorded as the graph's `int8` variant; the folder is locked meanwhile.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from effdiff import __version__
from effdiff._deps import require
from effdiff.artifacts import Manifest, Variant, files_in_place, folder_lock, move_into_place, variant_file
from effdiff.calib.capture import CACHE_GRAPHS, CalibrationSet, CaptureSettings, capture, random_feeds
from effdiff.compare import Comparison, relative_l2
from effdiff.errors import EffdiffError
from effdiff.export.weights import store_float_weights_fp16
from effdiff.profiling import PeakRSS
from effdiff.runtime.backends.ort import OrtBackend
from effdiff.specs import UNET_GRAPHS, GraphSpec, Precision

MODES = ("static", "dynamic")
# Static QDQ layouts: `tensorrt` puts Q/DQ on the inputs of Conv/MatMul/Gemm only (float bias, float
# outputs), what TensorRT's explicit quantization fuses; `cpu` also quantizes their outputs and biases
# (int32), which lets ONNX Runtime's CPU provider fuse DQ -> op -> Q into QLinearConv / QLinearMatMul.
TARGETS = ("tensorrt", "cpu")
METHODS = ("minmax", "percentile", "entropy")
# What the halves are calibrated on (the ablation); `unet` always reads `whole`, and unet_deep /
# unet_shallow `cache` (or random inputs with `random`).
SOURCES = ("propagation", "whole", "random")
# Kept in float by default, after NVIDIA's diffusion INT8 recipe: the time embedding, conv_in, conv_out,
# the shortcut convolutions and the output norm. (ModelOpt's filter also keeps each resnet's
# `time_emb_proj`; add `--exclude time_emb_proj` for that: it costs size, see README.)
DEFAULT_EXCLUDE = (
    "time_embedding",
    r"^conv_in$",
    r"^conv_out$",
    "conv_shortcut",
    r"^conv_norm_out$",
)
STATIC_OPS = ("Conv", "MatMul", "Gemm")
# How the weights of the layers left in float are stored: fp16 (read through a Cast to float32, which
# ONNX Runtime folds at session creation and TensorRT at build, so they still compute in fp32 on the
# CPU) or fp32. fp16 halves what the exclusions cost on disk: the SD1.5 decoder's nine float shortcut
# convolutions alone kept it 3.496x smaller than fp32; fp16 rounding (2^-11 relative) is two orders
# below INT8's error.
FLOAT_WEIGHTS = ("fp16", "fp32")
DYNAMIC_OPS = ("MatMul", "Gemm")
# A sanity bound, not a quality claim: INT8 is judged by adherence and PSNR; this catches broken graphs.
INT8_TOLERANCE = 0.25
# Graphs over this size are pre-processed and calibrated with external data (protobuf's 2 GiB cap).
LARGE_BYTES = 1_000_000_000
# What each graph is validated on: the inputs the runtime gives it.
VALIDATION_STREAM = {
    "unet": "whole",
    "unet_encoder": "propagation",
    "unet_decoder": "propagation",
    "unet_deep": "cache",
    "unet_shallow": "cache",
}


@dataclass(frozen=True)
class QuantizeOptions:
    mode: str = "static"
    target: str = "tensorrt"
    method: str = "percentile"
    percentile: float = 99.999
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    source: str = "propagation"
    graphs: tuple[str, ...] = ()  # () = every UNet graph the folder has in fp32
    float_weights: str = "fp16"

    def __post_init__(self) -> None:
        checked = (
            ("mode", MODES),
            ("target", TARGETS),
            ("method", METHODS),
            ("source", SOURCES),
            ("float_weights", FLOAT_WEIGHTS),
        )
        for name, allowed in checked:
            if getattr(self, name) not in allowed:
                raise EffdiffError(
                    f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}"
                )
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise EffdiffError(
                    f"--exclude {pattern!r} is not a valid regular expression: {exc}"
                ) from None
        unknown = [g for g in self.graphs if g not in UNET_GRAPHS]
        if unknown:
            raise EffdiffError(
                f"INT8 graphs must be among {', '.join(UNET_GRAPHS)}, got {', '.join(unknown)}"
            )
        if not 0 < self.percentile <= 100:
            raise EffdiffError(f"percentile must be in (0, 100], got {self.percentile}")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["exclude"] = list(self.exclude)
        data["graphs"] = list(self.graphs)
        return data


# ---------------------------------------------------------------- node scopes and the exclusion policy


def node_scope(node: Any) -> str:
    """The diffusers module a node came from (`up_blocks.0.resnets.1.conv_shortcut`), read from the
    dynamo exporter's `namespace` metadata; the node's name when there is none."""
    meta = {p.key: p.value for p in node.metadata_props}
    names = [seg.split(":")[0].strip() for seg in meta.get("namespace", "").split("/")]
    dotted = [n for n in names if "." in n]
    if not dotted:
        return node.name
    # drop the wrappers' names: every graph module holds the diffusers UNet as `unet`, some through
    # another wrapper (unet_deep: `encoder.unet.conv_in`)
    parts = dotted[-1].split(".")
    return ".".join(parts[parts.index("unet") + 1 :] if "unet" in parts else parts[1:])


@dataclass
class LayerPlan:
    """Which nodes of a graph are quantized and which stay in float, and why."""

    quantize: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)  # node name -> reason

    def summary(self) -> dict[str, Any]:
        reasons = Counter(self.excluded.values())
        return {"quantized": len(self.quantize), "excluded": len(self.excluded), "reasons": dict(reasons)}


def plan_layers(model: Any, op_types: tuple[str, ...], exclude: tuple[str, ...]) -> LayerPlan:
    """Nodes of `op_types` with a constant weight are quantized unless a pattern matches their scope;
    MatMuls of two activations (attention scores) stay in float, as in NVIDIA's INT8 recipe."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    plan = LayerPlan()
    compiled = [re.compile(p) for p in exclude]
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        scope = node_scope(node)
        hit = next((p.pattern for p in compiled if p.search(scope) or p.search(node.name)), None)
        if hit is not None:
            plan.excluded[node.name] = f"pattern {hit}"
        elif len(node.input) < 2 or node.input[1] not in constants:
            plan.excluded[node.name] = "no constant weight (activation x activation)"
        else:
            plan.quantize.append(node.name)
    return plan


# ---------------------------------------------------------------- the TensorRT-suitability check


@dataclass
class QdqCheck:
    """Structure of a QDQ graph as TensorRT's explicit quantization wants it."""

    quantize_nodes: int
    dequantize_nodes: int
    quantized_ops: dict[str, int]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def check_qdq(model: Any, allowed: tuple[str, ...] = STATIC_OPS) -> QdqCheck:
    """Every QuantizeLinear feeds only DequantizeLinear; every DequantizeLinear feeds only Conv, MatMul or
    Gemm and reads a QuantizeLinear or an int8 weight; zero points are 0 (symmetric int8, the only kind
    TensorRT takes). Q/DQ anywhere else would leave TensorRT an op it cannot fuse around them."""
    onnx = require("onnx")
    consumers: dict[str, list[Any]] = {}
    producers: dict[str, Any] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producers[name] = node
    inits = {i.name: i for i in model.graph.initializer}
    problems: list[str] = []
    quantized: Counter[str] = Counter()
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    for node in q:
        bad = [c.op_type for c in consumers.get(node.output[0], []) if c.op_type != "DequantizeLinear"]
        if bad:
            problems.append(f"QuantizeLinear {node.name} feeds {', '.join(sorted(set(bad)))}")
    for node in dq:
        users = consumers.get(node.output[0], [])
        bad = [c.op_type for c in users if c.op_type not in allowed]
        if bad or not users:
            problems.append(f"DequantizeLinear {node.name} feeds {', '.join(sorted(set(bad))) or 'nothing'}")
        for user in users:
            quantized[user.op_type] += 1
        src = node.input[0]
        if src in inits:
            if inits[src].data_type != onnx.TensorProto.INT8:
                problems.append(f"weight {src} is not int8")
        elif src not in producers or producers[src].op_type != "QuantizeLinear":
            problems.append(
                f"DequantizeLinear {node.name} reads {src}, neither a weight nor a QuantizeLinear"
            )
    for node in (*q, *dq):
        if len(node.input) > 2 and node.input[2] in inits:
            zp = onnx.numpy_helper.to_array(inits[node.input[2]])
            if zp.dtype != np.int8 or np.any(zp != 0):
                problems.append(
                    f"{node.op_type} {node.name} has zero point {zp.dtype} != 0 (not symmetric int8)"
                )
    return QdqCheck(len(q), len(dq), dict(quantized), problems[:20])


# ---------------------------------------------------------------- calibration data for onnxruntime


class FeedsReader:
    """onnxruntime's CalibrationDataReader interface over checked feeds (`get_next`, `set_range` for
    strided collection, which bounds the calibrator's memory to one sample's activations)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self.start, self.end = 0, len(feeds)
        self._it: Iterator[dict[str, np.ndarray]] = iter(())
        self.set_range(0, len(feeds))

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self.feeds[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def check_feeds(
    graph: str, spec: GraphSpec, model_inputs: list[str], feeds: list[dict[str, np.ndarray]]
) -> None:
    """EffdiffError when calibration inputs do not match the graph: names, dtypes, shapes."""
    if not feeds:
        raise EffdiffError(
            f"no calibration samples for {graph}: the capture recorded none for it (too few prompts or "
            "--samples, or a schedule that never calls it); capture again with more --samples"
        )
    for i, f in enumerate(feeds):
        if sorted(f) != sorted(model_inputs):
            raise EffdiffError(
                f"calibration sample {i} for {graph} has inputs {sorted(f)}; "
                f"the graph takes {sorted(model_inputs)}"
            )
        try:
            spec.check_inputs(f)
        except ValueError as exc:
            raise EffdiffError(f"calibration sample {i} does not fit the graph: {exc}") from None


# ---------------------------------------------------------------- reports


@dataclass
class Int8GraphResult:
    graph: str
    skipped: bool
    fp32_bytes: int
    int8_bytes: int
    comparisons: list[Comparison] = field(default_factory=list)
    layers: dict[str, Any] = field(default_factory=dict)
    qdq: QdqCheck | None = None
    calibration_samples: int = 0
    validation_samples: int = 0
    seconds: float = 0.0
    peak_rss_gib: float = 0.0

    @property
    def size_ratio(self) -> float:
        return self.fp32_bytes / max(self.int8_bytes, 1)

    @property
    def worst_rel_l2(self) -> float:
        return max((c.rel_l2 for c in self.comparisons), default=float("nan"))


@dataclass
class Int8Report:
    artifacts: Path
    options: QuantizeOptions
    calibration: CalibrationSet
    results: list[Int8GraphResult]

    @property
    def passed(self) -> bool:
        return all(c.passed for r in self.results for c in r.comparisons)

    def table(self) -> str:
        o = self.options
        how = (
            f"static QDQ ({o.target} layout), {o.method} calibration on {o.source} inputs"
            if o.mode == "static"
            else "dynamic (MatMul/Gemm weights; activations quantized at run time)"
        )
        lines = [
            f"INT8 {how}; rel L2 vs fp32 on held-out captured inputs",
            f"{'graph':<13} {'fp32 MiB':>9} {'int8 MiB':>9} {'smaller':>8} {'quant/float':>11} "
            f"{'calib':>5} {'val':>4} {'rel L2':>8} {'TRT QDQ':>8} {'s':>6}",
        ]
        for r in self.results:
            layers = f"{r.layers.get('quantized', 0)}/{r.layers.get('excluded', 0)}"
            qdq = "n/a" if r.qdq is None else ("ok" if r.qdq.ok else "NO")
            lines.append(
                f"{r.graph:<13} {r.fp32_bytes / 2**20:>9.1f} {r.int8_bytes / 2**20:>9.1f} "
                f"{r.size_ratio:>7.2f}x {layers:>11} {r.calibration_samples:>5} {r.validation_samples:>4} "
                f"{r.worst_rel_l2:>8.4f} {qdq:>8} {r.seconds:>6.1f}" + ("  (kept)" if r.skipped else "")
            )
        return "\n".join(lines)


# ---------------------------------------------------------------- quantization of one graph


@contextlib.contextmanager
def _inside(folder: Path) -> Iterator[None]:
    """Run with `folder` as the working directory: onnxruntime's pre-processing leaves temporary files
    in the working directory, and they belong in our temporary folder, not the user's."""
    old = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def _quantize_file(
    src: Path,
    dest: Path,
    options: QuantizeOptions,
    reader: FeedsReader | None,
    large: bool,
    log: Callable[[str], None],
) -> tuple[LayerPlan, QdqCheck | None]:
    """fp32 ONNX file -> INT8 ONNX file (one file, or with `dest.data` when still large)."""
    onnx = require("onnx")
    require("onnxruntime")
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    work = dest.parent
    original = onnx.load(str(src), load_external_data=False)  # names and scopes only
    ops = STATIC_OPS if options.mode == "static" else DYNAMIC_OPS
    layers = plan_layers(original, ops, options.exclude)
    del original
    pre = work / "preprocessed.onnx"
    # onnxruntime's calibrators print a line per sample; our progress bar and log say what happens
    with _inside(work), contextlib.redirect_stdout(io.StringIO()):
        log("pre-processing (onnxruntime quant_pre_process)")
        quant_pre_process(
            str(src),
            str(pre),
            skip_symbolic_shape=True,  # symbolic shape inference fails on the decoder
            save_as_external_data=large,
            all_tensors_to_one_file=True,
            external_data_location=f"{pre.name}.data",
        )
        if options.mode == "static":
            assert reader is not None
            log(f"calibrating ({options.method}, {len(reader)} samples) and quantizing")
            method = {
                "minmax": CalibrationMethod.MinMax,
                "percentile": CalibrationMethod.Percentile,
                "entropy": CalibrationMethod.Entropy,
            }[options.method]
            quantize_static(
                str(pre),
                str(dest),
                reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(STATIC_OPS),
                per_channel=True,
                reduce_range=False,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=layers.quantize,
                use_external_data_format=large,
                calibrate_method=method,
                extra_options={
                    "ActivationSymmetric": True,
                    "WeightSymmetric": True,
                    "CalibStridedMinMax": 1,  # one sample's activations in memory at a time
                    "CalibPercentile": options.percentile,
                    **(
                        {  # Q/DQ on the inputs of Conv/MatMul/Gemm only, float bias: what TensorRT fuses
                            "OpTypesToExcludeOutputQuantization": list(STATIC_OPS),
                            "QuantizeBias": False,
                        }
                        if options.target == "tensorrt"
                        else {}
                    ),
                },
            )
        else:
            log("quantizing MatMul/Gemm weights (dynamic)")
            quantize_dynamic(
                str(pre),
                str(dest),
                op_types_to_quantize=list(DYNAMIC_OPS),
                per_channel=False,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=layers.quantize,
                use_external_data_format=large,
                extra_options={"MatMulConstBOnly": True},
            )
    model = onnx.load(str(dest))  # with its external data, if any
    qdq = None
    if options.mode == "static" and options.target == "tensorrt":
        float_consumers_read_float(model)
        qdq = check_qdq(model)
    if options.float_weights == "fp16":
        store_float_weights_fp16(model)
    for stale in work.glob(f"{dest.name}.data"):
        stale.unlink()
    if model.ByteSize() < LARGE_BYTES:  # one file again
        onnx.save(model, str(dest))
    else:
        onnx.save(model, str(dest), save_as_external_data=True, location=f"{dest.name}.data")
    return layers, qdq


def float_consumers_read_float(model: Any, allowed: tuple[str, ...] = STATIC_OPS) -> int:
    """onnxruntime routes every consumer of a quantized activation through its DequantizeLinear, float
    ops included (a skip tensor feeding a quantized Conv and a Concat). Give those float consumers the
    original tensor back, so Q/DQ sits on Conv/MatMul/Gemm inputs only. Returns the inputs rewired."""
    producers = {o: n for n in model.graph.node for o in n.output}
    float_source = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            q = producers.get(node.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                float_source[node.output[0]] = q.input[0]
    rewired = 0
    for node in model.graph.node:
        if node.op_type in allowed or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            if name in float_source:
                node.input[i] = float_source[name]
                rewired += 1
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    dead = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] not in used]
    for n in dead:
        model.graph.node.remove(n)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for n in [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.output[0] not in used]:
        model.graph.node.remove(n)
    return rewired


def _validate(
    graph: str, fp32_path: Path, int8_path: Path, spec: GraphSpec, feeds: list[dict[str, np.ndarray]]
) -> tuple[list[Comparison], dict[str, float]]:
    """One Comparison per output over all held-out samples together (||int8 - fp32|| / ||fp32||), and
    the mean and worst per-sample relative L2."""
    backend = OrtBackend(["CPUExecutionProvider"])
    ref, got = backend.open(fp32_path, spec), backend.open(int8_path, spec)
    pairs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {n: [] for n in spec.output_names}
    for f in feeds:
        want, have = ref.run(f), got.run(f)
        for name in spec.output_names:
            pairs[name].append((np.asarray(have[name]), np.asarray(want[name])))
    ref.close(), got.close()
    comps, per_sample = [], []
    for name, values in pairs.items():
        have = np.concatenate([h.ravel() for h, _ in values])
        want = np.concatenate([w.ravel() for _, w in values])
        diff = float(np.abs(have.astype(np.float64) - want).max())
        comps.append(
            Comparison(
                graph, f"held-out ({len(values)})", name, diff, relative_l2(have, want), INT8_TOLERANCE
            )
        )
        per_sample += [relative_l2(h, w) for h, w in values]
    stats = {
        "mean_sample_rel_l2": float(np.mean(per_sample)),
        "worst_sample_rel_l2": float(np.max(per_sample)),
    }
    return comps, stats


def _recipe_key(source_sha: str, calib_sha: str, options: QuantizeOptions) -> str:
    ort = require("onnxruntime")
    # which other graphs the same job quantized does not change this one: a later job that asks for
    # more (or fewer) graphs keeps it
    recipe = {k: v for k, v in options.to_json().items() if k != "graphs"}
    payload = json.dumps(
        {
            "source": source_sha,
            "calibration": calib_sha,
            "options": recipe,
            "effdiff": __version__,
            "onnxruntime": ort.__version__,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _calibration_feeds(
    graph: str, calib: CalibrationSet, options: QuantizeOptions, spec: GraphSpec, seed: int
) -> list[dict[str, np.ndarray]]:
    """What `graph` is calibrated on. `unet` reads the whole run's encoder feeds (the same inputs);
    unet_deep and unet_shallow what the `cache` run fed them."""
    if options.source == "random":
        real = list(calib.feeds(calib.select(VALIDATION_STREAM[graph], _captured(graph), False)))
        if not real:
            return []
        batch = real[0]["encoder_hidden_states"].shape[0]
        lat = next(v for k, v in real[0].items() if k in ("sample", "skip_00")).shape[2:]
        h, w = int(lat[0]), int(lat[1])
        return random_feeds({graph: spec}, graph, len(real), batch, h, w, seed)
    stream = "whole" if graph == "unet" else options.source
    if graph in CACHE_GRAPHS:
        stream = VALIDATION_STREAM[graph]
    return list(calib.feeds(calib.select(stream, _captured(graph), False)))


def _captured(graph: str) -> str:
    return "unet_encoder" if graph == "unet" else graph


# ---------------------------------------------------------------- the whole job


def quantize_artifacts(
    artifacts: Path,
    options: QuantizeOptions,
    settings: CaptureSettings,
    calib_dir: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Int8Report:
    """Capture (or resume) the calibration set, then quantize, validate and record each UNet graph as
    its `int8` variant. Graphs already quantized from the same source, calibration and options are
    kept. EffdiffError for artifacts without the graphs, a folder another writer holds, bad inputs."""
    log = log or (lambda _msg: None)
    artifacts = Path(artifacts).absolute()  # the pre-processing runs in another working directory
    manifest = Manifest.read(artifacts)
    fp32 = [g for g in UNET_GRAPHS if Precision.FP32.value in manifest.variants(g)]
    missing = [g for g in options.graphs if g not in fp32]
    if missing:
        raise EffdiffError(
            f"{artifacts} has no fp32 {', '.join(missing)} graph to quantize; export it first with "
            "`effdiff-export onnx`"
        )
    if not options.graphs:
        if not all(g in fp32 for g in CACHE_GRAPHS):  # one without the other cannot be calibrated
            fp32 = [g for g in fp32 if g not in CACHE_GRAPHS]
        if not fp32:
            raise EffdiffError(f"{artifacts} has no fp32 UNet graph to quantize; run `effdiff-export onnx`")
        options = replace(options, graphs=tuple(fp32))
    if any(g in CACHE_GRAPHS for g in options.graphs) and not settings.cache:
        settings = replace(settings, cache=True)  # their calibration inputs come from the `cache` run
    _refuse_hard_linked_data(artifacts, manifest, options.graphs)
    calib_dir = Path(calib_dir).absolute() if calib_dir is not None else artifacts / "calibration"
    with folder_lock(artifacts, "an INT8 quantization"):
        for stale in artifacts.glob(".tmp-int8-*"):  # left by a quantization that was killed
            shutil.rmtree(stale, ignore_errors=True)
        calib = capture(artifacts, calib_dir, settings, progress=progress, log=log)
        manifest = Manifest.read(artifacts)
        specs = manifest.specs(Precision.INT8)
        results = []
        bar = tqdm(options.graphs, desc="int8", unit="graph", disable=not progress)
        for graph in bar:
            bar.set_postfix_str(graph)
            results.append(_one_graph(artifacts, manifest, graph, specs[graph], calib, options, log))
        bar.close()
    return Int8Report(artifacts, options, calib, results)


def _refuse_hard_linked_data(artifacts: Path, manifest: Manifest, graphs: tuple[str, ...]) -> None:
    """onnx refuses to read external data through a file with several hard links (a guard against
    hardlink attacks), deep inside the quantizer; say so up front, before the calibration run."""
    for graph in graphs:
        fp32 = manifest.variant(graph, Precision.FP32.value)
        for name in fp32.files:
            path = artifacts / name
            if name != fp32.file and path.is_file() and path.stat().st_nlink > 1:
                raise EffdiffError(
                    f"{path} has {path.stat().st_nlink} hard links, and onnx refuses to load external "
                    "data through one: copy the folder (cp -r) instead of linking its files"
                )


def _one_graph(
    artifacts: Path,
    manifest: Manifest,
    graph: str,
    spec: GraphSpec,
    calib: CalibrationSet,
    options: QuantizeOptions,
    log: Callable[[str], None],
) -> Int8GraphResult:
    ort = require("onnxruntime")
    fp32 = manifest.variant(graph, Precision.FP32.value)
    source_sha = fp32.files[fp32.file].sha256
    calib_sha = calib.sha256 if options.source != "random" else f"random+{calib.sha256}"
    key = _recipe_key(source_sha, calib_sha, options)
    name = Precision.INT8.value
    file = variant_file(graph, name)
    old = manifest.variants(graph).get(name)
    if old is not None and old.recipe_key == key and files_in_place(artifacts, old.files):
        log(f"{graph}: INT8 with this source, calibration and options exists, kept")
        check = old.meta.get("qdq_check")
        return Int8GraphResult(
            graph,
            True,
            fp32.size_bytes,
            old.size_bytes,
            list(old.validation),
            dict(old.meta.get("layers", {})),
            None if check is None else QdqCheck(0, 0, check["quantized_ops"], check["problems"]),
            int(old.meta.get("calibration_samples", 0)),
            int(old.meta.get("validation_samples", 0)),
        )
    holdout = list(calib.feeds(calib.select(VALIDATION_STREAM[graph], _captured(graph), True)))
    train = _calibration_feeds(graph, calib, options, spec, seed=calib.settings.get("seed", 0))
    onnx = require("onnx")
    model_inputs = [
        i.name for i in onnx.load(str(artifacts / fp32.file), load_external_data=False).graph.input
    ]
    n_train = len(train) if options.mode == "static" else 0
    if options.mode == "static":
        check_feeds(graph, spec, model_inputs, train)
    if holdout:
        check_feeds(graph, spec, model_inputs, holdout)
    large = fp32.size_bytes > LARGE_BYTES
    work = artifacts / f".tmp-int8-{graph}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    start = time.perf_counter()
    try:
        with PeakRSS() as mem:
            dest = work / file
            reader = FeedsReader(train) if options.mode == "static" else None
            layers, qdq = _quantize_file(artifacts / fp32.file, dest, options, reader, large, log)
            del reader, train
            comps, stats = (
                _validate(graph, artifacts / fp32.file, dest, spec, holdout) if holdout else ([], {})
            )
        outputs = [dest, *work.glob(f"{file}.data")]
        records = move_into_place(outputs, artifacts, file, old.files if old is not None else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - start
    variant = Variant(
        name=name,
        precision=Precision.INT8,
        file=file,
        files=records,
        validation=comps,
        recipe_key=key,
        stats={"seconds": round(seconds, 2), "peak_rss_gib": round(mem.peak_gib, 3), **stats},
        meta={
            "source_variant": Precision.FP32.value,
            "source_sha256": source_sha,
            "calibration_sha256": calib_sha,
            "calibration_samples": n_train,
            "validation_samples": len(holdout),
            "mode": options.mode,
            "target": options.target if options.mode == "static" else None,
            "method": options.method if options.mode == "static" else None,
            "percentile": options.percentile if options.method == "percentile" else None,
            "calibrated_on": options.source if options.mode == "static" else None,
            "exclude": list(options.exclude),
            "float_weights": options.float_weights,
            "layers": layers.summary(),
            "qdq_check": None
            if qdq is None
            else {"ok": qdq.ok, "problems": qdq.problems, "quantized_ops": qdq.quantized_ops},
            "onnxruntime": ort.__version__,
        },
    )
    manifest.graphs.setdefault(graph, {})[name] = variant
    manifest.write(artifacts)
    log(
        f"{graph}: INT8 in {seconds:.1f} s, "
        f"{fp32.size_bytes / 2**20:.1f} -> {variant.size_bytes / 2**20:.1f} MiB"
    )
    return Int8GraphResult(
        graph,
        False,
        fp32.size_bytes,
        variant.size_bytes,
        comps,
        layers.summary(),
        qdq,
        variant.meta["calibration_samples"],
        len(holdout),
        seconds,
        mem.peak_gib,
    )
