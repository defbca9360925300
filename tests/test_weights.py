"""fp16-stored weights (`effdiff-export fp16-weights`): each fp32 graph gets an `fp32-w16` variant about
half its size, checked against it; the runtime runs it with `fp16_weights=True`, close to fp32, and lean
sessions keep its weights fp16; a second run keeps what the first made; mistakes are one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from effdiff.artifacts import W16_TAG, Manifest, Variant, sha256_file
from effdiff.errors import EffdiffError
from effdiff.runtime.backends.ort import OrtBackend
from effdiff.runtime.memory import (
    FALLBACK,
    LEAN_OPTIONS,
    GraphCost,
    MemoryPlan,
    MemoryProfile,
    plan_memory,
)
from effdiff.runtime.pipeline import Pipeline
from effdiff.specs import GRAPHS, Precision

from .test_cli import assert_one_line_error, run


@pytest.fixture(scope="module")
def w16_folder(sd1_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny SD1 export with the fp16-weights variants written by the CLI."""
    folder = tmp_path_factory.mktemp("w16") / "art"
    shutil.copytree(sd1_artifacts, folder)
    proc = run("effdiff-export", "fp16-weights", "--artifacts", str(folder), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "fp32-w16 variants recorded" in proc.stdout and "unet_decoder" in proc.stdout
    return folder


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_every_fp32_graph_gets_a_checked_half_size_variant(w16_folder: Path) -> None:
    manifest = Manifest.read(w16_folder)
    graphs = [g for g in GRAPHS if "fp32" in manifest.variants(g)]
    assert {"text_encoder", "unet_encoder", "unet_decoder", "vae_decoder"} <= set(graphs)
    for graph in graphs:
        fp32, w16 = manifest.variant(graph, "fp32"), manifest.variant(graph, "fp32-w16")
        assert w16.file == f"{graph}.fp32-w16.onnx" and (w16_folder / w16.file).is_file()
        assert w16.precision is Precision.FP32 and w16.meta["float_weights"] == "fp16"
        assert w16.meta["source_sha256"] == sha256_file(w16_folder / fp32.file)
        # fp16 rounding of the weights: above zero, inside the fp16 tolerance
        assert w16.passed and 0 < max(c.rel_l2 for c in w16.validation) < 1e-2, graph
        # the files shrink by what the fp16 weights save (less the Casts' names, large in tiny graphs);
        # the UNet halves, mostly convolution weights, by a third at least
        saved = w16.meta["bytes_saved"]
        assert fp32.size_bytes - w16.size_bytes > 0.5 * saved > 0, (graph, saved)
        if graph in ("unet_encoder", "unet_decoder"):
            assert w16.size_bytes < 0.67 * fp32.size_bytes, (graph, w16.size_bytes, fp32.size_bytes)
        assert manifest.spec(graph, w16).meta.get("fp16_weights")
        assert not manifest.spec(graph, fp32).meta.get("fp16_weights")
    assert not list(w16_folder.glob(".tmp-*"))
    # a second run keeps them (same fp32 source)
    proc = run("effdiff-export", "fp16-weights", "--artifacts", str(w16_folder), "--quiet")
    assert proc.returncode == 0 and proc.stdout.count("| kept |") == len(graphs), proc.stdout
    assert Manifest.read(w16_folder).variant("unet_decoder", "fp32-w16").files == (
        manifest.variant("unet_decoder", "fp32-w16").files
    )


def test_runtime_runs_them_close_to_fp32_and_lean_keeps_them_fp16(w16_folder: Path) -> None:
    want = Pipeline.load(w16_folder)("a red circle", steps=6, propagation="uniform:2", seed=1)
    resident = Pipeline.load(w16_folder, fp16_weights=True)
    assert all(v.name == "fp32-w16" for v in resident.variants.values())
    got = resident("a red circle", steps=6, propagation="uniform:2", seed=1)
    assert 0 < _rel(got.latents, want.latents) < 1e-2
    lean = Pipeline.load(
        w16_folder, backend=OrtBackend(session_options=LEAN_OPTIONS, fp16_weights=True), lean=True
    )
    lean_got = lean("a red circle", steps=6, propagation="uniform:2", seed=1)
    assert 0 < _rel(lean_got.latents, want.latents) < 1e-2
    # lean sessions keep the fp16 weights (no constant folding, no layout level); resident ones fold
    for pipe, level in ((lean, "ORT_ENABLE_EXTENDED"), (resident, "ORT_ENABLE_ALL")):
        options = pipe.open_graph("unet_encoder").graph.session.get_session_options()
        assert str(options.graph_optimization_level).endswith(level)
    # a budget's lean plan runs them too
    budget = Pipeline.load(w16_folder, fp16_weights=True, memory_budget="8GiB")
    assert budget("a red circle", steps=2).info["memory_plan"]


def test_planner_counts_folded_weights_at_fp32(w16_folder: Path) -> None:
    """Without a profile, ONNX Runtime's defaults hold an fp16-stored graph at fp32 size, lean options
    at its own."""
    manifest = Manifest.read(w16_folder)
    w16 = manifest.variant("unet_decoder", "fp32-w16")
    default = MemoryProfile().cost("unet_decoder", w16, "default")
    lean = MemoryProfile().cost("unet_decoder", w16, "lean")
    assert default.resident == pytest.approx(2 * FALLBACK["default"][0] * w16.size_bytes)
    assert lean.resident == pytest.approx(FALLBACK["lean"][0] * w16.size_bytes)


def test_int8_unet_graphs_with_fp16_weights_are_the_int8_ones(sd1_artifacts: Path) -> None:
    manifest = Manifest.read(sd1_artifacts)
    int8 = Variant("int8", Precision.INT8, "unet_encoder.int8.onnx", {}, meta={"float_weights": "fp16"})
    manifest.graphs["unet_encoder"]["int8"] = int8
    assert manifest.find("unet_encoder", Precision.INT8, "onnx", W16_TAG) is int8
    assert manifest.find("vae_decoder", Precision.INT8, "onnx", W16_TAG) is None  # no fp32-w16 there
    assert manifest.spec("unet_encoder", int8).meta == {"quantized": True, "fp16_weights": True}


def test_mistakes_are_one_line_errors(sd1_artifacts: Path, w16_folder: Path, tmp_path: Path) -> None:
    generate = ["effdiff", "generate", "--prompt", "p", "--out", str(tmp_path / "o.png"), "--quiet"]
    # a folder without the variants says how to make them
    proc = run(*generate, "--artifacts", str(sd1_artifacts), "--fp16-weights")
    assert_one_line_error(proc, "effdiff-export fp16-weights")
    proc = run(*generate, "--artifacts", str(w16_folder), "--fp16-weights", "--precision", "fp16")
    assert_one_line_error(proc, "fp16 weights are for fp32 or int8 runs")
    with pytest.raises(EffdiffError, match="ort backend"):
        Pipeline.load(w16_folder, backend="torch", fp16_weights=True)
    with pytest.raises(EffdiffError, match="OrtBackend"):
        Pipeline.load(w16_folder, backend=OrtBackend(), fp16_weights=True)
    tagged = Pipeline.load(w16_folder, backend=OrtBackend(fp16_weights=True), fp16_weights=True)
    assert tagged.variants["unet_decoder"].name == "fp32-w16"
    proc = run("effdiff-export", "fp16-weights", "--artifacts", str(w16_folder), "--graphs", "unet_middle")
    assert_one_line_error(proc, "has no fp32 unet_middle")
    proc = run("effdiff-export", "fp16-weights", "--artifacts", str(tmp_path / "nothing"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr


def test_unet_graphs_opened_per_call_give_the_same_images(w16_folder: Path) -> None:
    """Each UNet graph opened for its call and dropped after (PerCallGraph): the same latents as
    sessions open for the whole phase, nothing left open, the opens counted as load time."""
    backend = OrtBackend(session_options=LEAN_OPTIONS, fp16_weights=True)
    pipe = Pipeline.load(w16_folder, backend=backend, lean=True)
    args = {"steps": 4, "propagation": "uniform:2", "seed": 3}
    whole = pipe("a cat", **args)
    pipe.graphs.per_call = ("unet_encoder", "unet_decoder")
    per_call = pipe("a cat", **args)
    np.testing.assert_array_equal(per_call.latents, whole.latents)
    assert per_call.calls == whole.calls and not pipe.graphs.open_names
    assert per_call.timings["load"] > whole.timings["load"] > 0


def test_planner_opens_fp16_weight_unet_graphs_per_call_last(w16_folder: Path) -> None:
    """Below the leanest plan that keeps both UNet graphs open, a folder with fp16-stored UNet weights
    gets one that opens them per call (its estimate: one graph's weights, not both); fp32 does not.
    A profile in SD1.5's proportions (GiB), where the UNet's weights dominate."""
    manifest = Manifest.read(w16_folder)
    graphs = ("unet_encoder", "unet_decoder")
    sizes = {"text_encoder": 0.3, "unet_encoder": 0.65, "unet_decoder": 0.95, "vae_decoder": 0.1}
    gib, pixels = 2**30, 64 * 64
    costs = {
        g: {
            v: {o: GraphCost(w * gib, 0.0, 0.2 * gib / (2 * pixels), 1.0, True) for o in ("default", "lean")}
            for v in ("fp32", "fp32-w16")
        }
        for g, w in sizes.items()
    }
    profile = MemoryProfile(costs, 0.1 * gib, "synthetic")

    def leanest(variant: str) -> tuple[MemoryPlan, str]:
        variants = {g: manifest.variant(g, variant) for g in sizes}
        plans = []
        for budget in [b / 64 for b in range(512, 0, -1)]:  # 8 GiB down to 1/64 GiB
            try:
                plans.append(
                    plan_memory(
                        manifest, variants, graphs, 2, (64, 64), int(budget * gib), profile, 0.1 * gib
                    )
                )
            except EffdiffError as exc:
                return plans[-1], str(exc)
        raise AssertionError("no budget refused")

    w16, refusal = leanest("fp32-w16")
    assert w16.unet_per_call and "UNet graphs opened for each call" in w16.describe()
    # the UNet phase holds the larger graph and its activations, not both graphs
    assert w16.estimate < (0.1 + 0.95 + 0.65) * gib
    fp32, fp32_refusal = leanest("fp32")
    assert not fp32.unet_per_call and fp32.estimate > w16.estimate
    assert "--fp16-weights" in fp32_refusal and "--fp16-weights" not in refusal


def test_bench_w16_configurations() -> None:
    from effdiff.bench.harness import parse_configs

    configs = {
        c.name: c for c in parse_configs(["fd:uniform:2+w16", "fd:uniform:2+w16+budget:2GiB"], "ddim", 10)
    }
    assert configs["fd:uniform:2+w16"].fp16_weights and not configs["full"].fp16_weights
    assert configs["fd:uniform:2+w16+budget:2GiB"].memory_budget == "2GiB"
