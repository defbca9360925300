"""Export a diffusers pipeline to split-UNet ONNX graphs, validate each, and describe them in the manifest.

One graph at a time: a component is loaded only while its graphs are exported and validated, and
ONNX programs and sessions are dropped before the next, so an SD1.5-size model fits in 24 GB.
What each graph is (component, module, dynamic shapes, cases) comes from `effdiff.export.graphs`;
how it is checked from `effdiff.export.validate`.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
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

from effdiff import __version__
from effdiff._deps import require
from effdiff.artifacts import (
    MANIFEST,
    SCHEDULER_CONFIG,
    TOKENIZER_DIR,
    TOKENIZER_FILE,
    FileRecord,
    Manifest,
    SourceInfo,
    TokenizerInfo,
    Variant,
    check_writable_folder,
    files_in_place,
    folder_lock,
    mark_verified,
    read_json,
    remove_stale_temporaries,
    variant_file,
    write_json,
)
from effdiff.compare import Comparison, worst_table
from effdiff.errors import EffdiffError, ValidationFailed
from effdiff.export.attention import check_attention, translation_table
from effdiff.export.graphs import EXPORTS, TOLERANCE
from effdiff.export.models import ModelSource, load_component, quiet_libraries, resolve_model
from effdiff.export.validate import (
    VALIDATION_PROMPTS,
    case_inputs,
    to_graph_dtype,
    validate_chain,
    validate_graph,
)
from effdiff.profiling import PeakRSS
from effdiff.runtime.backends.ort import OrtBackend
from effdiff.runtime.tokenizer import PromptTokenizer
from effdiff.specs import GRAPHS, Geometry, GraphSpec, Precision, build_specs

# Graphs whose weights exceed this go to one external data file (protobuf caps a file at 2 GiB).
EXTERNAL_DATA_BYTES = 1_500_000_000
ONNX_PRECISIONS = (Precision.FP32, Precision.FP16)
# Two graphs that together must equal the whole diffusers UNet: second(first(x)) on the same inputs.
CHAINS = (("unet_encoder", "unet_decoder"), ("unet_deep", "unet_shallow"))


@dataclass(frozen=True)
class ExportRecipe:
    opset: int = 20
    precision: Precision = Precision.FP32  # fp32 or fp16: the variant this export writes
    height: int | None = None  # image pixels; default: the UNet's sample_size x VAE factor
    width: int | None = None
    cache_branch: int = 0  # DeepCache's branch for the unet_deep / unet_shallow graphs
    attention: str = "standard"  # or "fused": ONNX Runtime's MultiHeadAttention (effdiff.export.attention)

    def to_json(self) -> dict[str, Any]:
        out = {
            "opset": self.opset,
            "precision": self.precision.value,
            "height": self.height,
            "width": self.width,
            "cache_branch": self.cache_branch,
        }
        if self.attention != "standard":  # recipes written before the option keep their keys
            out["attention"] = self.attention
        return out


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
    manifest: Manifest
    results: list[GraphResult]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def table(self) -> str:
        """Worst case per graph output: the figures the manifest holds."""
        return "\n".join(worst_table([c for r in self.results for c in r.comparisons]))


# ---------------------------------------------------------------- torch -> ONNX


def _export_graph(
    module: Any,
    spec: GraphSpec,
    feeds: dict[str, np.ndarray],
    dest: Path,
    opset: int,
    precision: Precision,
    attention: str = "standard",
) -> list[Path]:
    """torch.onnx (dynamo) export into a temp folder beside `dest`; returns the files written there."""
    torch = require("torch")
    if precision is Precision.FP16:
        module = copy.deepcopy(module).half()
    args = [torch.from_numpy(feeds[n]) for n in spec.input_names]  # already in the graph's dtypes
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    tmp = dest.parent / f".tmp-{spec.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                tuple(args),
                dynamo=True,
                opset_version=opset,
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_shapes=EXPORTS[spec.name].dynamic_shapes(spec),
                custom_translation_table=translation_table(attention, spec.name),
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


def install_files(files: list[Path], out: Path, graph_file: str) -> dict[str, FileRecord]:
    """Move data files first and the graph file last: a graph file present means its data is complete.
    Returns each installed file's size and sha256."""
    tmp = files[0].parent
    records = {}
    for f in sorted(files, key=lambda p: p.name == graph_file):
        records[f.name] = FileRecord.of(f)
        os.replace(f, out / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
    mark_verified(out, records)  # just hashed: the first load need not hash them again
    return records


# ---------------------------------------------------------------- the export


def _recipe_key(source_hash: str, recipe: ExportRecipe) -> str:
    payload = json.dumps(
        {"source": source_hash, "recipe": recipe.to_json(), "effdiff": __version__}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _reusable(out: Path, variant: Variant | None, key: str) -> bool:
    if variant is None or variant.recipe_key != key or not variant.passed:
        return False
    return files_in_place(out, variant.files)


def _export_tokenizer(source: ModelSource, out: Path, geom: Geometry) -> TokenizerInfo:
    transformers = require("transformers")
    try:
        tok = transformers.CLIPTokenizer.from_pretrained(source.path / "tokenizer")
    except (OSError, ValueError, TypeError) as exc:
        raise EffdiffError(
            f"cannot load the tokenizer of {source.path}: {str(exc).splitlines()[0]}"
        ) from None
    tmp = out / f".tmp-tokenizer-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)  # converts vocab.json + merges.txt folders to tokenizer.json too
    final = out / TOKENIZER_DIR
    same = (final / "tokenizer.json").is_file() and (final / "tokenizer.json").read_bytes() == (
        tmp / "tokenizer.json"
    ).read_bytes()
    if same:  # a resumed export leaves the folder's tokenizer untouched
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    return TokenizerInfo(
        file=TOKENIZER_FILE,
        max_length=min(int(tok.model_max_length), geom.text_len),
        bos_id=int(tok.bos_token_id),
        eos_id=int(tok.eos_token_id),
        pad_id=int(tok.pad_token_id),
        vocab_size=len(tok),
    )


def _support_records(out: Path) -> dict[str, FileRecord]:
    records = {n: FileRecord.of(out / n) for n in (TOKENIZER_FILE, SCHEDULER_CONFIG)}
    mark_verified(out, records)
    return records


def _old_manifest(out: Path) -> Manifest | None:
    """The folder's manifest when it is one this effdiff reads; anything else is replaced."""
    if not (out / MANIFEST).exists():
        return None
    try:
        return Manifest.read(out)
    except EffdiffError:
        return None


def _base_manifest(
    source: ModelSource,
    source_hash: str,
    geom: Geometry,
    size: tuple[int, int],
    out: Path,
    recipe: ExportRecipe,
    old: Manifest | None,
) -> Manifest:
    """Tokenizer and scheduler config written into `out`, and the manifest that describes them, with
    the graph variants of `old` (the same model's earlier export) carried over."""
    tokenizer = _export_tokenizer(source, out, geom)
    try:
        unchanged = read_json(out / SCHEDULER_CONFIG) == source.scheduler_config
    except EffdiffError:
        unchanged = False
    if not unchanged:
        write_json(out / SCHEDULER_CONFIG, source.scheduler_config)
    return Manifest(
        source=SourceInfo(source.name, str(source.path), source_hash),
        family=source.family,
        prediction_type=source.prediction_type,
        geometry=geom,
        export_size=size,
        tokenizer=tokenizer,
        recipe=recipe.to_json(),
        support_files=_support_records(out),
        graphs={g: dict(vs) for g, vs in old.graphs.items()} if old else {},
        chain_validation=dict(old.chain_validation) if old else {},
    )


def write_source_manifest(model: str, out: Path) -> Manifest:
    """An artifacts folder without graphs: tokenizer, scheduler config and a manifest naming the source
    model, which is all the `torch` backend needs (it builds its graphs from the model). An existing
    export of the same model keeps its graphs; one of another model loses its manifest first."""
    source = resolve_model(model)
    quiet_libraries()
    out = Path(out)
    check_writable_folder(out)
    from effdiff.export.split import geometry_from_configs

    geom = geometry_from_configs(source.unet_config, source.vae_config, source.text_config)
    sample = source.unet_config.get("sample_size", 64) * geom.vae_factor
    size = geom.latent_size(sample, sample)
    with folder_lock(out, "an export"):
        remove_stale_temporaries(out)
        source_hash = source.content_hash()
        old = _old_manifest(out)
        foreign = old.source.content_hash != source_hash if old is not None else (out / MANIFEST).exists()
        if foreign:  # as the export does: never a mix of two models the runtime would accept
            (out / MANIFEST).unlink()
            old = None
        manifest = _base_manifest(source, source_hash, geom, size, out, ExportRecipe(), old)
        manifest.write(out)
    return manifest


def export_onnx(
    model: str,
    out: Path,
    recipe: ExportRecipe | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> ExportReport:
    """Export, validate, and describe in `out/manifest.json`. Raises ValidationFailed (artifacts kept)
    when a graph is beyond tolerance, EffdiffError for bad input or a folder another writer holds."""
    recipe = recipe or ExportRecipe()
    if recipe.precision not in ONNX_PRECISIONS:
        raise EffdiffError("ONNX export writes fp32 or fp16; for int8 run `effdiff-export int8` afterwards")
    check_attention(recipe.attention)
    log = log or (lambda _msg: None)
    source = resolve_model(model)  # cheap for a folder: a bad path is named before torch loads
    quiet_libraries()  # the first import of the `export` extra: a missing one is named next
    out = Path(out)
    check_writable_folder(out)
    from effdiff.export.split import geometry_from_configs

    geom = geometry_from_configs(
        source.unet_config, source.vae_config, source.text_config, recipe.cache_branch
    )
    sample = source.unet_config.get("sample_size", 64) * geom.vae_factor
    for name, px in (("height", recipe.height), ("width", recipe.width)):
        if px is not None and (px <= 0 or px % geom.pixel_multiple):
            raise EffdiffError(f"--{name} {px} must be a positive multiple of {geom.pixel_multiple}")
    lat_h, lat_w = geom.latent_size(recipe.height or sample, recipe.width or sample)
    with folder_lock(out, "an export"):
        return _export_locked(source, geom, (lat_h, lat_w), out, recipe, progress, log)


def _export_locked(
    source: ModelSource,
    geom: Geometry,
    size: tuple[int, int],
    out: Path,
    recipe: ExportRecipe,
    progress: bool,
    log: Callable[[str], None],
) -> ExportReport:
    remove_stale_temporaries(out)
    log(f"hashing {source.path} ...")
    source_hash = source.content_hash()
    key = _recipe_key(source_hash, recipe)
    old = _old_manifest(out)
    foreign = old.source.content_hash != source_hash if old is not None else (out / MANIFEST).exists()
    if foreign:
        # Drop the old manifest before writing anything of the new model: the folder is then never a
        # mix of two models that the runtime would accept (it refuses a folder without a manifest).
        log(f"{out} held an export of another model (or of another effdiff); it will be replaced")
        (out / MANIFEST).unlink()
        old = None
    manifest = _base_manifest(source, source_hash, geom, size, out, recipe, old)
    tokenizer = manifest.tokenizer
    variant_name = recipe.precision.value
    specs = build_specs(geom, recipe.precision.float_dtype, tokenizer.vocab_size)
    fp32_specs = build_specs(geom, "float32", tokenizer.vocab_size)
    backend = OrtBackend(["CPUExecutionProvider"])
    ids = PromptTokenizer(out / tokenizer.file, tokenizer.max_length, tokenizer.pad_id, tokenizer.eos_id)(
        list(VALIDATION_PROMPTS)
    )
    tol = TOLERANCE[recipe.precision]
    results: list[GraphResult] = []
    ehs = np.zeros((1, geom.text_len, geom.text_hidden), np.float32)
    loaded: dict[str, Any] = {}  # the one diffusers component in memory

    def component(name: str) -> Any:
        if name not in loaded:
            loaded.clear()
            gc.collect()
            loaded[name] = load_component(source, name)
        return loaded[name]

    bar = tqdm(GRAPHS, desc="export", unit="graph", disable=not progress)
    for graph_name in bar:
        bar.set_postfix_str(graph_name)
        export, spec = EXPORTS[graph_name], specs[graph_name]
        file = variant_file(graph_name, variant_name)
        previous = manifest.graphs.get(graph_name, {}).get(variant_name)
        if _reusable(out, previous, key):
            assert previous is not None
            results.append(GraphResult(graph_name, skipped=True, comparisons=list(previous.validation)))
            log(f"{graph_name}: already exported with this recipe, kept")
            if graph_name == "text_encoder":
                graph = backend.open(out / file, spec)
                ehs = graph.run({"input_ids": ids})["last_hidden_state"].astype(np.float32)
            continue
        start = time.perf_counter()
        with PeakRSS() as mem:
            module = export.module(component(export.component), geom)
            cases = export.cases(geom, *size)
            trace_feeds = to_graph_dtype(
                spec, case_inputs(spec, cases[0], ehs, ids, np.random.default_rng(0))
            )
            files = _export_graph(
                module, spec, trace_feeds, out / file, recipe.opset, recipe.precision, recipe.attention
            )
            stale = set(previous.files if previous else ()) - {f.name for f in files}
            for name in stale:
                (out / name).unlink(missing_ok=True)
            records = install_files(files, out, file)
            gc.collect()
            graph = backend.open(out / file, spec)
            feature_module = (
                EXPORTS[export.features_from].module(component(export.component), geom)
                if export.features_from is not None
                else None
            )
            comparisons = validate_graph(
                export, module, graph, fp32_specs, cases, ehs, ids, tol, feature_module
            )
            if graph_name == "text_encoder":
                ehs = graph.run({"input_ids": ids})["last_hidden_state"].astype(np.float32)
            del graph, module, feature_module
            gc.collect()
        seconds = time.perf_counter() - start
        result = GraphResult(graph_name, False, seconds, mem.peak_gib, comparisons)
        results.append(result)
        variants = manifest.graphs.setdefault(graph_name, {})
        variants[variant_name] = Variant(
            name=variant_name,
            precision=recipe.precision,
            file=file,
            files=records,
            validation=comparisons,
            recipe_key=key,
            stats={"seconds": round(seconds, 2), "peak_rss_gib": round(mem.peak_gib, 3)},
        )
        # Variants made from the one just replaced (INT8, engines) no longer match it.
        for name, other in list(variants.items()):
            if (
                other.meta.get("source_variant") == variant_name
                and other.meta.get("source_sha256") != records[file].sha256
            ):
                del variants[name]
        manifest.write(out)  # after every graph: an interrupted export resumes from here
        log(f"{graph_name}: exported in {seconds:.1f} s, peak RSS {mem.peak_gib:.2f} GiB")

    with PeakRSS() as mem:
        start = time.perf_counter()
        whole = EXPORTS["unet"].module(component("unet"), geom)
        chain = []
        for first, second in CHAINS:
            a = backend.open(out / variant_file(first, variant_name), specs[first])
            b = backend.open(out / variant_file(second, variant_name), specs[second])
            cases = EXPORTS["unet"].cases(geom, *size)
            chain += validate_chain(a, b, whole, fp32_specs["unet"], cases, ehs, ids, tol)
            del a, b
        del whole
    loaded.clear()
    gc.collect()
    results.append(GraphResult("chain", False, time.perf_counter() - start, mem.peak_gib, chain))
    manifest.chain_validation[variant_name] = chain
    manifest.write(out)
    report = ExportReport(out, manifest, results)
    if not report.passed:
        raise ValidationFailed(report.table())
    return report
