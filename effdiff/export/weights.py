"""Weights stored fp16, computed in fp32: the `fp32-w16` variant of each fp32 ONNX graph.

ONNX Runtime's CPU provider has no fp16 Conv or MatMul kernels on x86: an fp16 graph runs there with a
Cast around every node, and at the SD1.5 architecture's 512x512 its UNet encoder peaked at 1.76 GiB
against 0.90 GiB for the fp32 graph with fp16-stored weights kept fp16 (README "Memory"). So for CPUs
this writes the fp32 graph with the weights of its Conv/MatMul/Gemm layers stored fp16, each read
through a Cast to fp32: half the disk, and half the memory when a session keeps them fp16
(`KEEP_FP16_WEIGHTS`, which the runtime's lean options set; ONNX Runtime's defaults fold them into fp32
copies at load, as fast as the fp32 graph). Each variant is checked against its fp32 source in ONNX
Runtime within the fp16 tolerance. Written atomically, one graph at a time, under the folder's lock; a
graph whose variant was made from the same fp32 file is kept, so an interrupted run resumes.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from effdiff._deps import require
from effdiff.artifacts import (
    W16_TAG,
    Manifest,
    Variant,
    files_in_place,
    folder_lock,
    move_into_place,
    remove_stale_temporaries,
    variant_file,
    variant_name,
)
from effdiff.compare import Comparison, compare_outputs
from effdiff.errors import EffdiffError
from effdiff.export.graphs import TOLERANCE
from effdiff.specs import GRAPHS, GraphSpec, Precision

W16 = variant_name(Precision.FP32, "onnx", W16_TAG)  # "fp32-w16"
# layers whose weights are stored fp16 (what dominates every graph's size; a Gather's table, e.g. the
# text encoder's token embedding, stays fp32: its Cast would copy the whole table at every call)
WEIGHT_OPS = ("Conv", "MatMul", "Gemm")


def store_float_weights_fp16(model: Any, ops: tuple[str, ...] = WEIGHT_OPS) -> int:
    """Store each float32 initializer that only `ops` nodes read (weights and float biases) as float16,
    read back through a Cast to float32. Initializers that overflow float16 stay float32. Returns the
    bytes saved."""
    require("onnx")
    from onnx import TensorProto, helper, numpy_helper

    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    graph_inputs = {i.name for i in model.graph.input}
    casts, saved = [], 0
    for init in model.graph.initializer:
        ops_reading = readers.get(init.name, set())
        if init.data_type != TensorProto.FLOAT or not ops_reading or not ops_reading <= set(ops):
            continue
        if init.name in graph_inputs:  # an overridable initializer: its type is part of the interface
            continue
        value = numpy_helper.to_array(init)
        half = value.astype(np.float16)
        if not np.isfinite(half).all():
            continue
        name, stored = init.name, f"{init.name}__fp16"
        init.CopyFrom(numpy_helper.from_array(half, stored))
        casts.append(helper.make_node("Cast", [stored], [name], name=f"{stored}_cast", to=TensorProto.FLOAT))
        saved += value.nbytes - half.nbytes
    nodes = [*casts, *model.graph.node]  # a Cast before every reader keeps the graph topologically sorted
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return saved


@dataclass
class W16Result:
    graph: str
    reused: bool
    fp32_bytes: int
    w16_bytes: int
    comparisons: list[Comparison] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)


@dataclass
class W16Report:
    folder: Path
    results: list[W16Result]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def table(self) -> str:
        """One line per graph, with its worst output."""
        lines = [
            "| graph | fp32 MiB | fp16 weights MiB | worst output | rel L2 | tol | status |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.results:
            c = max(r.comparisons, key=lambda c: (not c.passed, c.rel_l2))
            status = "FAIL" if not r.passed else "kept" if r.reused else "written"
            lines.append(
                f"| {r.graph} | {r.fp32_bytes / 2**20:.1f} | {r.w16_bytes / 2**20:.1f} | {c.output} | "
                f"{c.rel_l2:.2e} | {c.tolerance:.0e} | {status} |"
            )
        return "\n".join(lines)


def store_weights_fp16(
    artifacts: Path,
    graphs: tuple[str, ...] = (),
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> W16Report:
    """Write the `fp32-w16` variant of each named graph (default: every graph the folder has in fp32),
    check it against the fp32 graph, and record it in the manifest. EffdiffError for a folder without
    those fp32 graphs or one another writer holds."""
    from tqdm import tqdm

    log = log or (lambda _msg: None)
    artifacts = Path(artifacts)
    manifest = Manifest.read(artifacts)
    have = [g for g in GRAPHS if Precision.FP32.value in manifest.variants(g)]
    missing = [g for g in graphs if g not in have]
    if missing or not have:
        raise EffdiffError(
            f"{artifacts} has no fp32 {', '.join(missing) or 'graph'}; "
            "export it first with `effdiff-export onnx`"
        )
    results = []
    with folder_lock(artifacts, "storing weights fp16"):
        remove_stale_temporaries(artifacts)  # of a run killed part-way; we hold the lock
        bar = tqdm(graphs or tuple(have), desc="fp16 weights", unit="graph", disable=not progress)
        for graph in bar:
            bar.set_postfix_str(graph)
            results.append(_one_graph(artifacts, Manifest.read(artifacts), graph, log))
        bar.close()
    return W16Report(artifacts, results)


def _one_graph(artifacts: Path, manifest: Manifest, graph: str, log: Callable[[str], None]) -> W16Result:
    onnx = require("onnx")
    fp32 = manifest.variant(graph, Precision.FP32.value)
    source_sha = fp32.files[fp32.file].sha256
    old = manifest.variants(graph).get(W16)
    if (
        old is not None
        and old.meta.get("source_sha256") == source_sha
        and files_in_place(artifacts, old.files)
    ):
        log(f"{graph}: fp16 weights of this fp32 graph exist, kept")
        return W16Result(graph, True, fp32.size_bytes, old.size_bytes, list(old.validation))
    file = variant_file(graph, W16)
    work = artifacts / f".tmp-w16-{graph}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    start = time.perf_counter()
    try:
        model = onnx.load(str(artifacts / fp32.file))
        saved = store_float_weights_fp16(model)
        dest = work / file
        # weights in a file of their own, which ONNX Runtime memory-maps: a session that keeps them
        # fp16 holds no copy of them and opens in milliseconds
        onnx.save(model, str(dest), save_as_external_data=True, location=f"{file}.data")
        del model
        meta = {
            "source_variant": Precision.FP32.value,
            "source_sha256": source_sha,
            "float_weights": "fp16",
            "bytes_saved": saved,
        }
        spec16 = manifest.spec(graph, Variant(W16, Precision.FP32, file, {}, meta=meta))
        comparisons = _validate(manifest, artifacts / fp32.file, manifest.spec(graph, fp32), dest, spec16)
        files = list(work.iterdir())
        for f in files:
            f.chmod(dest.stat().st_mode)  # onnx writes the data file private; as the graph, per umask
        records = move_into_place(files, artifacts, file, old.files if old is not None else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - start
    variant = Variant(
        name=W16,
        precision=Precision.FP32,
        file=file,
        files=records,
        validation=comparisons,
        recipe_key=source_sha,
        stats={"seconds": round(seconds, 2)},
        meta=meta,
    )
    manifest.graphs.setdefault(graph, {})[W16] = variant
    manifest.write(artifacts)  # after every graph: an interrupted run resumes from here
    log(
        f"{graph}: fp16 weights in {seconds:.1f} s, "
        f"{fp32.size_bytes / 2**20:.1f} -> {variant.size_bytes / 2**20:.1f} MiB"
    )
    return W16Result(graph, False, fp32.size_bytes, variant.size_bytes, comparisons, seconds)


def _validate(
    manifest: Manifest, fp32_path: Path, spec: GraphSpec, w16_path: Path, spec16: GraphSpec
) -> list[Comparison]:
    """Both graphs on the same random inputs (2 rows, a latent of twice the UNet's factor: cheap for
    every graph), the fp16-weights one as lean sessions open it (its weights kept fp16)."""
    from effdiff.runtime.backends.ort import KEEP_FP16_WEIGHTS, OrtBackend

    side = 2 * manifest.geometry.unet_factor
    feeds = spec.sample_inputs(2, side, side, np.random.default_rng(0), timesteps=np.array([981.0, 21.0]))
    if "input_ids" in feeds:
        feeds["input_ids"] = np.minimum(feeds["input_ids"], manifest.tokenizer.vocab_size - 1)
    cpu = ["CPUExecutionProvider"]
    ref = OrtBackend(cpu).open(fp32_path, spec)
    want = ref.run(feeds)
    ref.close()
    kept = OrtBackend(cpu, session_options={KEEP_FP16_WEIGHTS: True}).open(w16_path, spec16)
    got = kept.run(feeds)
    kept.close()
    return compare_outputs(spec.name, "fp16 weights", got, want, TOLERANCE[Precision.FP16])
