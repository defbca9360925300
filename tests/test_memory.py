"""Memory budgets: sizes parse, the planner picks the fastest plan that fits a profile, and refuses in
one line when none does; the pipeline applies the plan it chose."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from effdiff.artifacts import Manifest
from effdiff.errors import EffdiffError
from effdiff.runtime.images import default_overlap, tile_for_count, tile_starts
from effdiff.runtime.memory import (
    FALLBACK_VAE_ACTIVATION_PER_PIXEL,
    GraphCost,
    MemoryProfile,
    parse_size,
    plan_memory,
)
from effdiff.runtime.pipeline import Pipeline

from .test_cli import assert_one_line_error, run

GIB = 2**30


def test_parse_size() -> None:
    assert parse_size("2GiB") == 2 * GIB and parse_size("1.5 GB") == 1_500_000_000
    assert parse_size("800MiB") == 800 * 2**20 and parse_size("3e9") == 3_000_000_000
    for bad in ("two", "-1GiB", "0", "1.5 parsecs"):
        with pytest.raises(EffdiffError, match="memory budget"):
            parse_size(bad)


def _profile(manifest: Manifest) -> MemoryProfile:
    """A synthetic profile in the proportions of SD1.5 with INT8 UNet halves (GiB): at 512x512 the VAE
    decode's activations outgrow the UNet's, so tiling it pays."""
    sizes = {"text_encoder": 0.5, "unet_encoder": 0.35, "unet_decoder": 0.5, "vae_decoder": 0.2}
    costs = {}
    for graph, gib in sizes.items():
        act = 4.0 if graph == "vae_decoder" else 0.3  # at 512x512 the VAE decode peaks highest
        costs[graph] = {
            "fp32": {
                "default": GraphCost(gib * 1.5 * GIB, gib * GIB, act * GIB / (2 * 64 * 64), 1.0, True),
                "lean": GraphCost(
                    gib * 1.05 * GIB, gib * 0.3 * GIB, act * 0.8 * GIB / (2 * 64 * 64), 1.0, True
                ),
            }
        }
    return MemoryProfile(costs, 0.2 * GIB, "synthetic")


def test_planner_picks_the_fastest_plan_that_fits(sd1_artifacts: Path) -> None:
    manifest = Manifest.read(sd1_artifacts)
    variants = {
        g: manifest.variant(g, "fp32")
        for g in ("text_encoder", "unet_encoder", "unet_decoder", "vae_decoder")
    }
    graphs = ("unet_encoder", "unet_decoder")
    profile = _profile(manifest)

    def plan(budget: float):  # 512x512, one image with CFG
        return plan_memory(
            manifest, variants, graphs, 2, (64, 64), int(budget * GIB), profile, profile.baseline
        )

    plans, refused = [], []
    for budget in [b / 8 for b in range(128, 3, -1)]:  # 16 GiB down to 0.5 GiB
        try:
            plans.append((budget, plan(budget)))
        except EffdiffError as exc:
            refused.append(budget)
            assert "no plan fits" in str(exc) and "\n" not in str(exc)
    # a measured activation is never planned below the weight-based estimate (in-process
    # measurements can reuse freed heap and come out low)
    vae = profile.cost("vae_decoder", variants["vae_decoder"], "default")
    assert vae.activation(1, 64 * 64) >= FALLBACK_VAE_ACTIVATION_PER_PIXEL * 64 * 64
    first = plans[0][1]
    assert first.resident == ("*",) and first.options == "default" and first.vae_tile is None
    # everything resident: every session, plus the most one phase adds while it creates or runs its
    # graphs (the shared arena gives each phase's blocks back: other phases' activations are not held)
    costs = {g: profile.cost(g, v, "default") for g, v in variants.items()}
    phases = {"text_encoder": (2, ("text_encoder",)), "unet": (2, graphs), "vae": (1, ("vae_decoder",))}
    per_phase = [
        max(max(costs[g].create_extra for g in gs), max(costs[g].activation(rows, 64 * 64) for g in gs))
        for rows, gs in phases.values()
    ]
    sessions = sum(c.resident for c in costs.values())
    assert first.estimate == pytest.approx(profile.baseline + sessions + max(per_phase))
    ranks = [p.rank for _, p in plans]
    assert ranks == sorted(ranks), "a smaller budget never gets a faster plan"
    assert all(p.estimate <= b * GIB and "measured profile" in p.describe() for b, p in plans)
    assert any(p.vae_tile for _, p in plans) and any(p.options == "lean" for _, p in plans)
    # a tiled VAE beside the resident UNet is tried before the UNet is reloaded every generation
    tiled = [p for _, p in plans if p.vae_tile]
    assert tiled[0].resident == graphs and "unet_encoder, unet_decoder resident" in tiled[0].describe()
    # the largest tiles first: two a side, not the half side's three
    tile = tiled[0].vae_tile
    assert tile == tile_for_count(64, 2) and len(tile_starts(64, tile, default_overlap(tile))) == 2
    assert refused and max(refused) < min(b for b, _ in plans), "refusals only below the leanest plan"
    # last resort before refusing: the guidance rows one at a time, which halves the UNet's activations
    leanest = plans[-1][1]
    assert leanest.unet_rows == 1 and "UNet on 1 row per call" in leanest.describe()
    assert all(p.unet_rows is None for _, p in plans if p.rank < leanest.rank - 1)


@pytest.mark.parametrize("side", [16, 33, 64, 96, 128])
def test_two_tiles_a_side_cover_it_with_the_least_work(side: int) -> None:
    """The tile chosen for two a side covers the side in two overlapping tiles and no smaller tile does;
    half-side tiles need three (2.25x the VAE's work against 1.27-1.34x)."""
    tile = tile_for_count(side, 2)
    starts = tile_starts(side, tile, default_overlap(tile))
    assert len(starts) == 2 and starts[-1] + tile == side and starts[0] + tile > starts[1]
    assert len(tile_starts(side, tile - 1, default_overlap(tile - 1))) > 2
    assert len(tile_starts(side, side // 2, default_overlap(side // 2))) == 3
    assert (2 * tile) ** 2 < 1.4 * side**2


def test_last_resorts_keep_the_vae_whole_when_it_fits(sd1_artifacts: Path) -> None:
    """When the UNet's activations set the peak, running its guidance rows one at a time can leave room
    for the VAE whole: the planner keeps it whole then, instead of tiling it. A synthetic profile where
    the UNet halves need 2 GiB at 512x512 and the VAE little."""
    manifest = Manifest.read(sd1_artifacts)
    names = ("text_encoder", "unet_encoder", "unet_decoder", "vae_decoder")
    variants = {g: manifest.variant(g, "fp32") for g in names}
    sizes = {"text_encoder": 0.5, "unet_encoder": 0.35, "unet_decoder": 0.5, "vae_decoder": 0.2}
    costs = {}
    for graph, gib in sizes.items():
        act = (0.3 if graph == "vae_decoder" else 2.0) * GIB / (2 * 64 * 64)
        costs[graph] = {
            "fp32": {
                o: GraphCost(gib * f * GIB, gib * 0.3 * GIB, act, 1.0, True)
                for o, f in (("default", 1.5), ("lean", 1.05))
            }
        }
    profile = MemoryProfile(costs, 0.2 * GIB, "synthetic")
    plans = []
    for budget in [b / 16 for b in range(64, 16, -1)]:  # 4 GiB down to 1 GiB
        try:
            plans.append(
                plan_memory(
                    manifest,
                    variants,
                    ("unet_encoder", "unet_decoder"),
                    2,
                    (64, 64),
                    int(budget * GIB),
                    profile,
                    0.2 * GIB,
                )
            )
        except EffdiffError:
            break
    split = [p for p in plans if p.unet_rows == 1]
    assert split, "some budget needs the rows one at a time"
    assert any(p.vae_tile is None for p in split), [p.describe() for p in split]
    assert [p.rank for p in plans] == sorted(p.rank for p in plans)


@pytest.mark.parametrize("propagation", ["none", "uniform:2", "cache:2"])
def test_unet_rows_one_at_a_time_give_the_same_images(sd1_artifacts: Path, propagation: str) -> None:
    """The two guidance rows run as two calls (RowSplitGraph) on real sessions: the same latents."""
    pipe = Pipeline.load(sd1_artifacts)
    args = {"steps": 4, "propagation": propagation, "seed": 3, "guidance_scale": 5.0}
    whole = pipe(["a cat", "a dog"], **args)
    pipe.unet_rows = 1
    split = pipe(["a cat", "a dog"], **args)
    np.testing.assert_allclose(split.latents, whole.latents, rtol=1e-4, atol=1e-5)
    for graph, calls in whole.calls.items():  # 4 rows (2 prompts x CFG): four calls where one was
        assert split.calls[graph] == calls * (4 if graph.startswith("unet") else 1), graph


def test_pipeline_applies_its_plan(sd1_artifacts: Path, tmp_path: Path) -> None:
    pipe = Pipeline.load(sd1_artifacts, memory_budget="8GiB")
    res = pipe("a cat", steps=3, propagation="uniform:2")
    assert "all graphs resident" in res.info["memory_plan"]
    generate = ["effdiff", "generate", "--artifacts", str(sd1_artifacts), "--prompt", "p", "--quiet"]
    out = ["--out", str(tmp_path / "o.png")]
    assert_one_line_error(
        run(*generate, *out, "--memory-budget", "10MiB"), "no plan fits a memory budget of 0.01"
    )
    assert_one_line_error(run(*generate, *out, "--memory-budget", "lots"), "is not a size")


def test_profile_is_measured_and_kept_per_variant(sd1_artifacts: Path, tmp_path: Path) -> None:
    """`effdiff profile-memory` measures real sessions; a second profile (another precision, other
    graphs) adds to the folder's profile instead of replacing it."""
    import shutil

    from effdiff.runtime.memory import profile_memory

    folder = tmp_path / "art"
    shutil.copytree(sd1_artifacts, folder)
    manifest = Manifest.read(folder)

    def measure(graphs: tuple[str, ...]) -> MemoryProfile:
        variants = {g: manifest.variant(g, "fp32") for g in graphs}
        specs = {g: manifest.spec(g, v) for g, v in variants.items()}
        return profile_memory(folder, manifest, variants, specs, (16, 16))

    measure(("text_encoder", "vae_decoder"))
    measure(("unet",))
    profile = MemoryProfile.read(folder)
    assert profile is not None and set(profile.costs) == {"text_encoder", "vae_decoder", "unet"}
    for variants in profile.costs.values():
        costs = variants["fp32"]
        assert set(costs) == {"default", "lean"} and all(c.measured for c in costs.values())
        # a tiny graph can fit in memory the allocator already holds, but never costs nothing at all
        assert (
            costs["default"].resident >= 0 and costs["default"].resident + costs["default"].create_extra > 0
        )
    # activations grow with the image: the VAE decode at 16x16 latents peaks above its weights
    vae = profile.costs["vae_decoder"]["fp32"]["lean"]
    assert vae.activation(1, 64 * 64) > vae.activation(1, 16 * 16) > 0


def test_shared_arena_sessions_give_the_same_images(sd1_artifacts: Path) -> None:
    """The CPU backend's default sessions and lean ones put the UNet graphs on one arena registered with
    ONNX Runtime's environment and the VAE on none: sessions that run in turn (resident, and lean mode
    opening and closing them, twice each) reuse the arena's blocks and compute what sessions with arenas
    of their own do."""
    from effdiff.runtime.backends.ort import SHARED_ARENA, OrtBackend
    from effdiff.runtime.memory import LEAN_OPTIONS

    assert LEAN_OPTIONS.get(SHARED_ARENA), "lean plans use the shared arena"
    args = {"steps": 3, "propagation": "uniform:2", "seed": 1, "guidance_scale": 4.0}
    own_arenas = Pipeline.load(sd1_artifacts, backend=OrtBackend(session_options={}))("a cat", **args)
    default = Pipeline.load(sd1_artifacts)
    lean = Pipeline.load(sd1_artifacts, backend=OrtBackend(session_options=LEAN_OPTIONS), lean=True)
    for pipe in (default, lean) * 2:
        np.testing.assert_allclose(pipe("a cat", **args).latents, own_arenas.latents, rtol=1e-5, atol=1e-6)
    assert lean.graphs.open_names == () and "vae_decoder" in default.graphs.open_names

    def allocation(pipe: Pipeline, graph: str) -> tuple[str, bool, bool, bool]:
        """(on the shared arena, an arena of its own, memory pattern, buffer reuse) of the graph's
        session"""
        options = pipe.open_graph(graph).graph.session.get_session_options()  # type: ignore[attr-defined]
        try:
            env = options.get_session_config_entry("session.use_env_allocators")
        except Exception:  # onnxruntime raises for an entry never set
            env = "0"
        return env, options.enable_cpu_mem_arena, options.enable_mem_pattern, options.enable_mem_reuse

    # default and lean alike, the UNet graphs run on the shared arena without the memory pattern, the
    # VAE on no arena with it (its planned block comes from the system for each run) and without buffer
    # reuse (a dead tensor's buffer is not held for a later one); lean UNet graphs go without reuse too
    for pipe, reuse in ((default, True), (lean, False)):
        env, _, pattern, unet_reuse = allocation(pipe, "unet_encoder")
        assert (env, pattern, unet_reuse) == ("1", False, reuse)
        assert allocation(pipe, "vae_decoder") == ("0", False, True, False)


def _fresh_process(script: str) -> dict[str, Any]:
    """Run `script` in a fresh interpreter (nothing earlier in its heap or arenas) and return the JSON
    object its last line prints."""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _onnx_model(graph: Any) -> Any:
    """An ONNX model of `graph` at opset 13, IR 7 (what the runtime's one-op arena releaser is)."""
    from onnx import helper

    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


def test_freed_heap_pages_go_back_to_the_os() -> None:
    """What a session's load frees stays in the process under glibc until malloc_trim; the runtime gives
    it back after opening and after closing each graph. Measured with the real allocator in a fresh
    process (so no earlier hole in the heap takes the buffers): 256 MiB of 64 KiB arrays (below glibc's
    mmap threshold, so on the heap) freed under a live array above them."""
    from effdiff.runtime.graphs import give_back_freed_memory

    if not give_back_freed_memory():
        pytest.skip("not glibc: no malloc_trim to give memory back through")
    script = """
import json, numpy as np, psutil
from effdiff.runtime.graphs import give_back_freed_memory
rss = lambda: psutil.Process().memory_info().rss
buffers = [np.ones(16 << 10, np.float32) for _ in range(4096)]
top = np.ones(16 << 10, np.float32)  # keeps the heap's top in use, so free() alone cannot shrink it
held = rss()
del buffers
freed = rss()
ok = give_back_freed_memory()
print(json.dumps({"held": held, "freed": freed, "trimmed": rss(), "ok": ok}))
"""
    m = _fresh_process(script)
    assert m["ok"]
    assert m["held"] - m["freed"] < 64 << 20, m  # glibc kept most of the freed pages
    assert m["freed"] - m["trimmed"] > 128 << 20, m  # and gave them back when asked


def test_identity_model_is_what_onnx_serializes() -> None:
    """The runtime writes out the one-op graph that shrinks the shared arena (it does not depend on the
    onnx package); it must stay the model onnx itself builds."""
    from onnx import TensorProto, helper

    from effdiff.runtime.backends.ort import _IDENTITY_MODEL

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    assert _onnx_model(graph).SerializeToString() == _IDENTITY_MODEL


def test_a_shared_arena_graph_gives_its_blocks_back_between_phases(tmp_path: Path) -> None:
    """The shared arena outlives runs and sessions; when the phase that used a graph on it ends (the
    graph stays open) or the graph is closed, the arena's free blocks go back to the system, so the next
    phase does not sit on top of them. A graph whose 64 MiB intermediates come from the arena, in a
    fresh process (nothing else in the arena), real allocator."""
    from onnx import TensorProto, helper, save

    n = 16 << 20  # float32 elements: 64 MiB per intermediate
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    nodes = [
        helper.make_node("Add", ["x", "one"], ["a"]),
        helper.make_node("Mul", ["a", "a"], ["b"]),
        helper.make_node("Add", ["b", "a"], ["c"]),
        helper.make_node("ReduceSum", ["c"], ["y"], keepdims=1),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=[one])
    save(_onnx_model(graph), tmp_path / "g.onnx")
    script = f"""
import gc, json, numpy as np, psutil
from effdiff.runtime.backends.ort import OrtGraph, SHARED_ARENA
from effdiff.runtime.graphs import give_back_freed_memory
from effdiff.specs import Axis, GraphSpec, TensorSpec
rss = lambda: psutil.Process().memory_info().rss
spec = GraphSpec("unet_encoder", (TensorSpec("x", "float32", (Axis(size={n}),)),),
                 (TensorSpec("y", "float32", (Axis(size=1),)),))
options = {{SHARED_ARENA: True, "enable_mem_pattern": False}}
graph = OrtGraph({str(tmp_path / "g.onnx")!r}, spec, options=options)
graph.run({{"x": np.ones({n}, np.float32)}})
gc.collect(); give_back_freed_memory()
held = rss()
graph.end_phase()
ended = rss()
graph.run({{"x": np.ones({n}, np.float32)}})  # still open, takes fresh blocks
gc.collect(); give_back_freed_memory()
again = rss()
graph.close()
gc.collect(); give_back_freed_memory()
print(json.dumps({{"held": held, "ended": ended, "again": again, "closed": rss()}}))
"""
    m = _fresh_process(script)
    # at least two of the 64 MiB blocks went back each time
    assert m["held"] - m["ended"] > 100 << 20 and m["again"] - m["closed"] > 100 << 20, m


def _matmul_fp16_weights(path: Path, k: int, external: bool) -> None:
    """`y = x @ w` with a k x k weight stored fp16 behind a Cast (store_float_weights_fp16), saved to
    `path`, its weight in `path`.data when `external`."""
    from onnx import TensorProto, helper, numpy_helper, save

    from effdiff.export.weights import store_float_weights_fp16

    w = np.random.default_rng(0).standard_normal((k, k)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, k])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [numpy_helper.from_array(w, "w")]
    )
    model = _onnx_model(graph)
    assert store_float_weights_fp16(model) == k * k * 2
    extra = {"save_as_external_data": True, "location": f"{path.name}.data"} if external else {}
    save(model, path, **extra)


def test_fp16_weights_stay_fp16_when_asked(tmp_path: Path) -> None:
    """A graph storing its weights fp16 behind Casts (INT8 graphs' float layers) is folded into fp32
    copies by ONNX Runtime at session creation; with KEEP_FP16_WEIGHTS and a spec that says so, the
    session holds the fp16 weights only and computes the same. A 4096x4096 MatMul weight (64 MiB fp32,
    32 MiB fp16), each option in a fresh process, pre-packing off in both (it copies float weights)."""
    k = 4096
    _matmul_fp16_weights(tmp_path / "g.onnx", k, external=False)

    def measure(keep: bool) -> dict[str, Any]:
        script = f"""
import json, numpy as np, psutil
from effdiff.runtime.backends.ort import KEEP_FP16_WEIGHTS, OrtGraph
from effdiff.runtime.graphs import give_back_freed_memory
from effdiff.specs import Axis, GraphSpec, TensorSpec
rss = lambda: psutil.Process().memory_info().rss
io = lambda name: (TensorSpec(name, "float32", (Axis(size=1), Axis(size={k}))),)
spec = GraphSpec("unet_decoder", io("x"), io("y"), meta={{"fp16_weights": True}})
before = rss()
options = {{KEEP_FP16_WEIGHTS: {keep}, "config:session.disable_prepacking": "1"}}
graph = OrtGraph({str(tmp_path / "g.onnx")!r}, spec, options=options)
give_back_freed_memory()
session = rss() - before
out = graph.run({{"x": np.ones((1, {k}), np.float32)}})["y"]
level = str(graph.session.get_session_options().graph_optimization_level)
print(json.dumps({{"session": session, "y": out[0, :8].tolist(), "level": level}}))
"""
        return _fresh_process(script)

    kept, folded = measure(True), measure(False)
    assert "EXTENDED" in kept["level"] and "ALL" in folded["level"]
    assert folded["session"] - kept["session"] > 24 << 20, (kept, folded)  # fp32 copy vs fp16 weights
    np.testing.assert_allclose(kept["y"], folded["y"], rtol=1e-5)


def test_profile_counts_memory_mapped_weights_once_touched(tmp_path: Path) -> None:
    """A session that keeps fp16-stored weights memory-mapped from their file holds almost nothing
    until a run touches them; the profile's resident figure is taken after a run, so it holds them, and
    a run adds the Cast's transient fp32 copy (64 MiB), not the weights again (a 4096x4096 MatMul, 32
    MiB of fp16 weights in an external data file, lean options)."""
    k = 4096
    _matmul_fp16_weights(tmp_path / "g.onnx", k, external=True)
    script = f"""
import json
from effdiff.runtime.memory import _measure
from effdiff.specs import Axis, GraphSpec, TensorSpec
io = lambda name: (TensorSpec(name, "float32", (Axis(size=1), Axis(size={k}))),)
spec = GraphSpec("unet_decoder", io("x"), io("y"), meta={{"fp16_weights": True}})
cost = _measure({str(tmp_path / "g.onnx")!r}, spec, "lean", ["CPUExecutionProvider"], ((1, 1), (2, 2)), 1)
print(json.dumps({{"resident": cost.resident, "activation": cost.activation(1, 4)}}))
"""
    got = _fresh_process(script)
    assert 28 << 20 < got["resident"] < 64 << 20 and 60 << 20 < got["activation"] < 90 << 20, got
