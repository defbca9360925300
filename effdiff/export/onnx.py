"""Export a diffusers pipeline to split-UNet ONNX graphs, validate each against PyTorch, write the manifest.

One graph at a time: a component is loaded only while its graphs are exported and validated, and
ONNX programs and sessions are dropped before the next, so an SD1.5-size model fits in 24 GB.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from effdiff import __version__
from effdiff._deps import require
from effdiff.artifacts import (
    MANIFEST,
    SCHEDULER_CONFIG,
    TOKENIZER_DIR,
    graph_path,
    new_manifest,
    write_json,
    write_manifest,
)
from effdiff.bench.memory import PeakRSS
from effdiff.bench.quality import relative_l2
from effdiff.errors import EffdiffError, ValidationFailed
from effdiff.export.models import ModelSource, load_component, resolve_model
from effdiff.runtime.backend import OrtGraph
from effdiff.runtime.tokenizer import PromptTokenizer
from effdiff.specs import GRAPHS, Geometry, GraphSpec, build_specs

# Graphs whose weights exceed this go to one external data file (protobuf caps a file at 2 GiB).
EXTERNAL_DATA_BYTES = 1_500_000_000
VALIDATION_PROMPTS = ("a photo of a cat on a red background", "a small blue square at the top left")
# Realistic DDIM-50 timesteps (leading spacing, steps_offset 1): early, middle and late in sampling.
VALIDATION_TIMESTEPS = np.array([981.0, 501.0, 21.0, 741.0], dtype=np.float32)


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"

    @property
    def float_dtype(self) -> str:
        return "float16" if self is Precision.FP16 else "float32"

    @property
    def tolerance(self) -> float:
        """Relative L2 error allowed against fp32 PyTorch."""
        return 1e-2 if self is Precision.FP16 else 1e-4


@dataclass(frozen=True)
class ExportRecipe:
    opset: int = 20
    precision: Precision = Precision.FP32
    height: int | None = None  # image pixels; default: the UNet's sample_size x VAE factor
    width: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "precision": self.precision.value, "float_dtype": self.precision.float_dtype}


@dataclass(frozen=True)
class Comparison:
    """ONNX vs PyTorch for one output of one case."""

    graph: str
    case: str
    output: str
    max_abs: float
    rel_l2: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.rel_l2)) and self.rel_l2 <= self.tolerance


@dataclass
class GraphResult:
    graph: str
    skipped: bool
    seconds: float = 0.0
    peak_rss_gib: float = 0.0
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)


@dataclass
class ExportReport:
    out: Path
    manifest: dict[str, Any]
    results: list[GraphResult]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def table(self) -> str:
        """Worst case per graph output: the figures the manifest holds."""
        lines = [
            f"{'graph':<14} {'output':<18} {'cases':>5} {'max abs diff':>13} {'rel L2':>10} {'tol':>8}  ok",
            "-" * 78,
        ]
        for res in self.results:
            by_output: dict[str, list[Comparison]] = {}
            for c in res.comparisons:
                by_output.setdefault(c.output, []).append(c)
            for output, comps in by_output.items():
                worst = max(comps, key=lambda c: c.rel_l2 if np.isfinite(c.rel_l2) else np.inf)
                mark = "yes" if all(c.passed for c in comps) else "NO"
                lines.append(
                    f"{res.graph:<14} {output:<18} {len(comps):>5} {max(c.max_abs for c in comps):>13.3e} "
                    f"{worst.rel_l2:>10.3e} {worst.tolerance:>8.0e}  {mark}"
                )
        return "\n".join(lines)


def compare(
    graph: str, case: str, onnx_out: dict[str, np.ndarray], ref: dict[str, np.ndarray], tol: float
) -> list[Comparison]:
    out = []
    for name, want in ref.items():
        got = onnx_out[name].astype(np.float64)
        want = want.astype(np.float64)
        if got.shape != want.shape:
            raise EffdiffError(f"{graph} output {name} has shape {got.shape}, PyTorch gives {want.shape}")
        max_abs = float(np.abs(got - want).max())
        out.append(Comparison(graph, case, name, max_abs, relative_l2(got, want), tol))
    return out


# ---------------------------------------------------------------- torch side


def _torch_modules(graph: str, component: Any) -> Any:
    from effdiff.export import split

    wrappers = {
        "text_encoder": split.TextEncoder,
        "unet_encoder": split.UNetEncoder,
        "unet_decoder": split.UNetDecoder,
        "unet": split.WholeUNet,
        "vae_decoder": split.VAEDecoder,
    }
    return wrappers[graph](component).eval()


COMPONENT_OF = {
    "text_encoder": "text_encoder",
    "unet_encoder": "unet",
    "unet_decoder": "unet",
    "unet": "unet",
    "vae_decoder": "vae",
}


def _run_torch(module: Any, spec: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    torch = require("torch")
    with torch.inference_mode():
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in spec.input_names]
        args = [a.float() if a.is_floating_point() else a for a in args]
        outs = module(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return {n: o.float().numpy() for n, o in zip(spec.output_names, outs, strict=True)}


def _export_graph(
    module: Any, spec: GraphSpec, feeds: dict[str, np.ndarray], dest: Path, opset: int, precision: Precision
) -> list[Path]:
    """torch.onnx (dynamo) export into a temp folder beside `dest`; returns the files written there."""
    torch = require("torch")
    Dim = torch.export.Dim
    if precision is Precision.FP16:
        module = copy.deepcopy(module).half()
    args = [torch.from_numpy(feeds[n]) for n in spec.input_names]  # already in the graph's dtypes
    dyn = [{i: Dim.DYNAMIC for i, ax in enumerate(t.axes) if ax.base is not None} for t in spec.inputs]
    if spec.name == "unet_decoder":
        # forward(timestep, ehs, mid, *skips): the variadic skips are one nested entry
        dyn = [*dyn[:3], tuple(dyn[3:])]
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    tmp = dest.parent / f".tmp-{spec.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                tuple(args),
                dynamo=True,
                opset_version=opset,
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_shapes=tuple(dyn),
                verbose=False,
            )
            program.save(str(tmp / dest.name), external_data=external)
        del program
        _name_dynamic_axes(tmp / dest.name, spec)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(tmp.iterdir())


def _name_dynamic_axes(path: Path, spec: GraphSpec) -> None:
    """Replace the exporter's symbols (s53, s91...) with the spec's axis names throughout the graph."""
    onnx = require("onnx")
    model = onnx.load(str(path), load_external_data=False)
    io = {v.name: v for v in (*model.graph.input, *model.graph.output)}
    rename: dict[str, str] = {}
    for t in (*spec.inputs, *spec.outputs):
        dims = io[t.name].type.tensor_type.shape.dim
        for dim, axis in zip(dims, t.axes, strict=True):
            if axis.base is not None and dim.dim_param and dim.dim_param.isidentifier():
                rename.setdefault(dim.dim_param, axis.name)
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]
    onnx.save(model, str(path))


def _install(files: list[Path], out: Path, graph_file: Path) -> dict[str, int]:
    """Move data files first and the .onnx last: a graph file present means its data is complete."""
    tmp = files[0].parent
    sizes = {}
    for f in sorted(files, key=lambda p: p.name == graph_file.name):
        sizes[f.name] = f.stat().st_size
        os.replace(f, out / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
    return sizes


# ---------------------------------------------------------------- cases


def _cases(geom: Geometry, height: int, width: int) -> list[tuple[int, int, int]]:
    """(batch, latent_h, latent_w): two batch sizes at the export size and at a smaller non-square one."""
    f = geom.unet_factor
    h2 = max(f, (height // 2) // f * f)
    w2 = h2 + f
    return [(1, height, width), (2, height, width), (1, h2, w2), (2, h2, w2)]


def _case_name(batch: int, h: int, w: int) -> str:
    return f"b{batch} {h}x{w}"


def _inputs_for(
    spec: GraphSpec, case: tuple[int, int, int], ehs: np.ndarray, ids: np.ndarray, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    batch, h, w = case
    feeds = spec.sample_inputs(batch, h, w, rng, timesteps=VALIDATION_TIMESTEPS[:batch])
    if "encoder_hidden_states" in feeds:
        feeds["encoder_hidden_states"] = np.resize(ehs, (batch, *ehs.shape[1:])).astype(np.float32)
    if "input_ids" in feeds:
        feeds["input_ids"] = np.resize(ids, (batch, ids.shape[1]))
    return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in feeds.items()}


def _to_graph_dtype(spec: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {t.name: feeds[t.name].astype(t.dtype) for t in spec.inputs}


# ---------------------------------------------------------------- the export


def _recipe_key(source_hash: str, recipe: ExportRecipe) -> str:
    payload = json.dumps(
        {"source": source_hash, "recipe": recipe.to_json(), "effdiff": __version__}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _reusable(out: Path, record: dict[str, Any] | None, key: str) -> bool:
    if not record or record.get("recipe_key") != key or not record.get("passed"):
        return False
    return all((out / n).exists() and (out / n).stat().st_size == s for n, s in record["files"].items())


def _export_tokenizer(source: ModelSource, out: Path, geom: Geometry) -> dict[str, Any]:
    transformers = require("transformers")
    tok = transformers.CLIPTokenizer.from_pretrained(source.path / "tokenizer")
    tmp = out / f".tmp-tokenizer-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)  # converts vocab.json + merges.txt folders to tokenizer.json too
    final = out / TOKENIZER_DIR
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return {
        "file": f"{TOKENIZER_DIR}/tokenizer.json",
        "max_length": min(int(tok.model_max_length), geom.text_len),
        "bos_id": int(tok.bos_token_id),
        "eos_id": int(tok.eos_token_id),
        "pad_id": int(tok.pad_token_id),
        "vocab_size": len(tok),
    }


def _quiet_libraries() -> None:
    """Keep third-party progress bars and notices off the user's terminal; ours say what happens."""
    for name in ("diffusers", "transformers", "torch.onnx", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    require("transformers").utils.logging.disable_progress_bar()
    require("diffusers").utils.logging.disable_progress_bar()
    os.environ.setdefault("TORCH_LOGS", "-all")


def export_onnx(
    model: str,
    out: Path,
    recipe: ExportRecipe | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> ExportReport:
    """Export, validate, and describe in `out/manifest.json`. Raises ValidationFailed (artifacts kept)
    when a graph is beyond tolerance, EffdiffError for bad input."""
    recipe = recipe or ExportRecipe()
    log = log or (lambda _msg: None)
    torch = require("torch")
    _quiet_libraries()
    from effdiff.export.split import geometry_from_configs

    source = resolve_model(model)
    geom = geometry_from_configs(source.unet_config, source.vae_config, source.text_config)
    lat_h = (recipe.height or source.unet_config.get("sample_size", 64) * geom.vae_factor) // geom.vae_factor
    lat_w = (recipe.width or source.unet_config.get("sample_size", 64) * geom.vae_factor) // geom.vae_factor
    for name, px in (("height", recipe.height), ("width", recipe.width)):
        if px is not None and (px <= 0 or px % (geom.unet_factor * geom.vae_factor)):
            raise EffdiffError(
                f"--{name} {px} must be a positive multiple of {geom.unet_factor * geom.vae_factor}"
            )

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise EffdiffError(f"cannot write to {out}: {exc.strerror}") from exc

    log(f"hashing {source.path} ...")
    source_hash = source.content_hash()
    key = _recipe_key(source_hash, recipe)
    old: dict[str, Any] = {}
    if (out / MANIFEST).exists():
        try:
            old = json.loads((out / MANIFEST).read_text())
        except json.JSONDecodeError:
            old = {}
    if old.get("source", {}).get("content_hash") not in (None, source_hash):
        log(f"{out} held an export of another model; its graphs will be replaced")

    manifest = new_manifest()
    manifest.update(
        source={"model": source.name, "path": str(source.path), "content_hash": source_hash},
        family=source.family,
        prediction_type=source.prediction_type,
        recipe=recipe.to_json(),
        geometry=geom.to_json(),
        export_size={"latent_height": lat_h, "latent_width": lat_w},
        scheduler_config=SCHEDULER_CONFIG,
    )
    manifest["tokenizer"] = _export_tokenizer(source, out, geom)
    write_json(out / SCHEDULER_CONFIG, source.scheduler_config)
    specs = build_specs(geom, recipe.precision.float_dtype, manifest["tokenizer"]["vocab_size"])
    manifest["skip_layout"] = [
        {"name": n, "channels": c, "downsample": 2**lv}
        for n, (c, lv) in zip(specs["unet_encoder"].output_names[1:], geom.skips, strict=True)
    ]
    old_graphs = old.get("graphs", {}) if old.get("schema_version") == manifest["schema_version"] else {}

    tokenizer = PromptTokenizer(
        out / manifest["tokenizer"]["file"],
        manifest["tokenizer"]["max_length"],
        manifest["tokenizer"]["pad_id"],
        manifest["tokenizer"]["eos_id"],
    )
    ids = tokenizer(list(VALIDATION_PROMPTS))
    cases = _cases(geom, lat_h, lat_w)
    tol = recipe.precision.tolerance
    results: list[GraphResult] = []
    ehs: np.ndarray | None = None
    component_name, component = None, None

    bar = tqdm(GRAPHS, desc="export", unit="graph", disable=not progress)
    for graph in bar:
        bar.set_postfix_str(graph)
        spec = specs[graph]
        dest = graph_path(out, graph)
        record = old_graphs.get(graph)
        if _reusable(out, record, key):
            manifest["graphs"][graph] = record
            results.append(
                GraphResult(graph, skipped=True, comparisons=[Comparison(**c) for c in record["validation"]])
            )
            log(f"{graph}: already exported with this recipe, kept")
            if graph == "text_encoder":
                ehs = OrtGraph(dest, spec).run({"input_ids": ids})["last_hidden_state"].astype(np.float32)
            continue
        start = time.perf_counter()
        with PeakRSS() as mem:
            if COMPONENT_OF[graph] != component_name:
                component = None
                gc.collect()
                component_name = COMPONENT_OF[graph]
                component = load_component(source, component_name)
            module = _torch_modules(graph, component)
            rng = np.random.default_rng(0)
            # the text encoder has no spatial axes: two batch sizes are its cases
            graph_cases = cases[:2] if graph == "text_encoder" else cases
            case_inputs = [
                _inputs_for(
                    spec,
                    c,
                    ehs if ehs is not None else np.zeros((1, geom.text_len, geom.text_hidden), np.float32),
                    ids,
                    rng,
                )
                for c in graph_cases
            ]
            if graph == "unet_decoder":
                # realistic features: the PyTorch encoder's outputs on realistic latents
                enc_spec = specs["unet_encoder"]
                encoder = _torch_modules("unet_encoder", component)
                for feeds, c in zip(case_inputs, graph_cases, strict=True):
                    enc_feeds = _inputs_for(enc_spec, c, feeds["encoder_hidden_states"], ids, rng)
                    feeds.update(_run_torch(encoder, enc_spec, enc_feeds))
            refs = [_run_torch(module, spec, f) for f in case_inputs]
            with torch.inference_mode():
                files = _export_graph(
                    module, spec, _to_graph_dtype(spec, case_inputs[0]), dest, recipe.opset, recipe.precision
                )
            stale = set((record or {}).get("files", {})) - {f.name for f in files}
            for name in stale:
                (out / name).unlink(missing_ok=True)
            sizes = _install(files, out, dest)
            gc.collect()
            session = OrtGraph(dest, spec)
            comparisons: list[Comparison] = []
            for feeds, ref, c in zip(case_inputs, refs, graph_cases, strict=True):
                got = session.run(_to_graph_dtype(spec, feeds))
                case = f"b{c[0]}" if graph == "text_encoder" else _case_name(*c)
                comparisons += compare(graph, case, got, ref, tol)
                if graph == "text_encoder" and ehs is None:
                    ehs = got["last_hidden_state"].astype(np.float32)
            if graph == "text_encoder":
                ehs = session.run({"input_ids": ids})["last_hidden_state"].astype(np.float32)
            del session, refs
            gc.collect()
        result = GraphResult(graph, False, time.perf_counter() - start, mem.peak_gib, comparisons)
        results.append(result)
        manifest["graphs"][graph] = {
            "file": dest.name,
            "files": sizes,
            "external_data": len(sizes) > 1,
            "io": spec.to_json(),
            "dynamic_axes": {k: {str(i): n for i, n in v.items()} for k, v in spec.dynamic_axes().items()},
            "recipe_key": key,
            "passed": result.passed,
            "export_seconds": round(result.seconds, 2),
            "peak_rss_gib": round(result.peak_rss_gib, 3),
            "validation": [asdict(c) for c in comparisons],
        }
        write_manifest(out, manifest)  # after every graph: an interrupted export resumes from here
        log(f"{graph}: exported in {result.seconds:.1f} s, peak RSS {result.peak_rss_gib:.2f} GiB")

    # The chain decoder(encoder(x)) in ONNX against the whole diffusers UNet in PyTorch.
    if component_name != "unet":
        component = None
        gc.collect()
        component = load_component(source, "unet")
    with PeakRSS() as mem:
        chain = _validate_chain(out, specs, component, cases, ehs, ids, tol)
    chain.peak_rss_gib = mem.peak_gib
    results.append(chain)
    component = None
    gc.collect()
    manifest["chain_validation"] = [asdict(c) for c in results[-1].comparisons]
    manifest["passed"] = all(r.passed for r in results)
    write_manifest(out, manifest)
    report = ExportReport(out, manifest, results)
    if not report.passed:
        raise ValidationFailed(report.table())
    return report


def _validate_chain(
    out: Path,
    specs: dict[str, GraphSpec],
    unet: Any,
    cases: list[tuple[int, int, int]],
    ehs: np.ndarray | None,
    ids: np.ndarray,
    tol: float,
) -> GraphResult:
    from effdiff.export.split import WholeUNet

    start = time.perf_counter()
    enc_spec, dec_spec, whole_spec = specs["unet_encoder"], specs["unet_decoder"], specs["unet"]
    rng = np.random.default_rng(1)
    assert ehs is not None
    inputs = [_inputs_for(whole_spec, c, ehs, ids, rng) for c in cases]
    refs = [_run_torch(WholeUNet(unet).eval(), whole_spec, f) for f in inputs]
    encoder = OrtGraph(graph_path(out, "unet_encoder"), enc_spec)
    features = [encoder.run(_to_graph_dtype(enc_spec, f)) for f in inputs]
    del encoder
    decoder = OrtGraph(graph_path(out, "unet_decoder"), dec_spec)
    comparisons = []
    for f, feat, ref, c in zip(inputs, features, refs, cases, strict=True):
        feeds = _to_graph_dtype(dec_spec, {**f, **feat})
        comparisons += compare("chain", _case_name(*c), decoder.run(feeds), ref, tol)
    return GraphResult("chain", False, time.perf_counter() - start, comparisons=comparisons)
