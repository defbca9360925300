"""INT8: calibration capture through the runtime's hook, quantization with onnxruntime, the CLI, errors.

Real onnxruntime sessions and real onnxruntime.quantization on tiny-sd1 (a copy per module, so the
shared fixture folder keeps fp32 only). Short schedules keep the module near a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from effdiff.artifacts import Manifest, sha256_file
from effdiff.calib.capture import (
    CACHE_GRAPHS,
    CALIB_MANIFEST,
    CalibrationSet,
    CaptureSettings,
    capture,
    default_prompts,
    read_prompts,
)
from effdiff.calib.quantize import (
    INT8_TOLERANCE,
    QuantizeOptions,
    check_feeds,
    check_qdq,
    plan_layers,
    quantize_artifacts,
)
from effdiff.compare import psnr
from effdiff.errors import EffdiffError
from effdiff.runtime.backends.ort import OrtBackend
from effdiff.runtime.memory import LEAN_OPTIONS
from effdiff.runtime.pipeline import Pipeline

from .test_cli import assert_one_line_error, run

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("a red circle", "a blue square on white", "a green star", "a small yellow triangle")
KEYS = "0,3,6"  # a propagation schedule for 10 steps: the decoder reuses features for 2 later steps
CACHE_KEYS = (0, 3, 6, 9)  # the capture's default cache:3 on 10 steps


def settings(**kw: object) -> CaptureSettings:
    base = dict(prompts=PROMPTS, samples=9, per_prompt=3, steps=10, propagation=KEYS, chunk=1, holdout=0.34)
    return CaptureSettings(**{**base, **kw})  # type: ignore[arg-type]


def int8_args(artifacts: Path, samples: int) -> list[str]:
    """`effdiff-export int8` on a short schedule, minmax calibration."""
    return [
        "effdiff-export",
        "int8",
        "--artifacts",
        str(artifacts),
        "--samples",
        str(samples),
        "--steps",
        "10",
        "--propagation",
        KEYS,
        "--method",
        "minmax",
        "--quiet",
    ]


@pytest.fixture(scope="module")
def tiny(sd1_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "tiny-sd1"
    shutil.copytree(sd1_artifacts, out)
    return out


@pytest.fixture(scope="module")
def calib(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> CalibrationSet:
    return capture(tiny, tmp_path_factory.mktemp("calib") / "set", settings(), progress=False)


def without_graphs(src: Path, dest: Path, graphs: tuple[str, ...], variant: str | None = None) -> Path:
    """A copy of `src` whose manifest lacks `graphs` (or only their `variant`): an older or trimmed folder."""
    shutil.copytree(src, dest)
    data = json.loads((dest / "manifest.json").read_text())
    for graph in graphs:
        if variant is None:
            del data["graphs"][graph]
        else:
            data["graphs"][graph]["variants"].pop(variant)
    (dest / "manifest.json").write_text(json.dumps(data))
    return dest


def test_capture_records_what_each_half_sees(tiny: Path, calib: CalibrationSet) -> None:
    s = settings()
    assert s.prompts_used == 3 and s.holdout_prompts == 1
    for stream in ("whole", "propagation"):
        for graph in ("unet_encoder", "unet_decoder"):
            recs = calib.select(stream, graph, False) + calib.select(stream, graph, True)
            assert 0 < len(recs) <= s.samples, (stream, graph, len(recs))
            # held-out prompts never calibrate
            assert {r.prompt for r in calib.select(stream, graph, True)} == {2}
            assert {r.prompt for r in calib.select(stream, graph, False)} == {0, 1}
    # timestep-aware: each prompt's decoder samples are spread over the schedule's thirds
    for prompt in (0, 1, 2):
        steps = sorted(
            r.step
            for r in calib.records
            if r.graph == "unet_decoder" and r.prompt == prompt and r.stream == "whole"
        )
        assert steps[0] <= 3 and steps[-1] >= 7 and len(set(steps)) == 3, steps
    # the encoder under propagation runs at key steps only; on the whole run at any step
    assert {r.step for r in calib.records if r.stream == "propagation" and r.graph == "unet_encoder"} <= {
        0,
        3,
        6,
    }
    prop_dec = [r for r in calib.records if r.stream == "propagation" and r.graph == "unet_decoder"]
    assert any(r.key_step < r.step for r in prop_dec), "no decoder sample with cached features"
    assert all(r.key_step == r.step for r in calib.records if r.stream == "whole")
    # the decoder's features under propagation are the encoder's output at the key step, with a later
    # timestep: run the fp32 encoder on the recorded key-step inputs and compare
    manifest = Manifest.read(tiny)
    enc = OrtBackend(["CPUExecutionProvider"]).open(
        tiny / "unet_encoder.onnx", manifest.specs()["unet_encoder"]
    )
    checked = 0
    for rec in (r for r in prop_dec if r.key_step < r.step):
        key = next(
            r
            for r in calib.records
            if r.stream == "propagation"
            and r.graph == "unet_encoder"
            and r.prompt == rec.prompt
            and r.step == rec.key_step
        )
        enc_feeds, dec_feeds = next(calib.feeds([key])), next(calib.feeds([rec]))
        features = enc.run(enc_feeds)
        np.testing.assert_allclose(dec_feeds["mid"], features["mid"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dec_feeds["skip_00"], features["skip_00"], rtol=1e-4, atol=1e-5)
        assert dec_feeds["timestep"][0] < enc_feeds["timestep"][0]  # a later step, a smaller timestep
        checked += 1
    assert checked > 0
    # both guidance halves: rows [negative, prompt], the negative rows identical across prompts
    a, b = (next(calib.feeds([r])) for r in calib.select("whole", "unet_encoder", False)[:2])
    assert a["sample"].shape[0] == 2 and a["encoder_hidden_states"].shape[0] == 2
    np.testing.assert_array_equal(a["encoder_hidden_states"][0], b["encoder_hidden_states"][0])
    # the cache run (the folder has DeepCache's graphs): unet_deep at cache:3's key steps, unet_shallow
    # between, fed the deep feature unet_deep returned at the last key step
    assert calib.settings["cache"] is True and calib.settings["cache_interval"] == 3
    deep_recs = calib.select("cache", "unet_deep", False) + calib.select("cache", "unet_deep", True)
    shallow_recs = calib.select("cache", "unet_shallow", False) + calib.select("cache", "unet_shallow", True)
    assert deep_recs and {r.step for r in deep_recs} <= set(CACHE_KEYS)
    assert shallow_recs and not {r.step for r in shallow_recs} & set(CACHE_KEYS)
    assert all(r.key_step == max(k for k in CACHE_KEYS if k <= r.step) for r in shallow_recs)
    assert {r.prompt for r in calib.select("cache", "unet_shallow", True)} == {2}
    assert not [r for r in calib.records if r.stream == "cache" and r.graph not in CACHE_GRAPHS]
    deep = OrtBackend(["CPUExecutionProvider"]).open(tiny / "unet_deep.onnx", manifest.specs()["unet_deep"])
    checked = 0
    for rec in shallow_recs:
        key = next((r for r in deep_recs if r.prompt == rec.prompt and r.step == rec.key_step), None)
        if key is None:  # that key step was not among the recorded ones
            continue
        shallow_feeds = next(calib.feeds([rec]))
        np.testing.assert_allclose(
            shallow_feeds["deep"], deep.run(next(calib.feeds([key])))["deep"], rtol=1e-4, atol=1e-5
        )
        assert shallow_feeds["deep"].shape[0] == 2  # both guidance halves
        checked += 1
    assert checked > 0
    # checksums in the manifest are the shards'
    data = json.loads((calib.folder / CALIB_MANIFEST).read_text())
    assert data["complete"] and all(
        sha256_file(calib.folder / n) == rec["sha256"] for n, rec in data["shards"].items()
    )


def test_capture_killed_resumes_without_duplicates(tiny: Path, calib: CalibrationSet, tmp_path: Path) -> None:
    folder = tmp_path / "killed"
    code = (
        "import sys; from pathlib import Path; from tests.test_int8 import settings; "
        "from effdiff.calib.capture import capture; "
        f"capture(Path({str(tiny)!r}), Path({str(folder)!r}), settings(), progress=False)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)
    deadline = time.time() + 120
    killed_after = -1
    while time.time() < deadline and proc.poll() is None:
        manifest = folder / CALIB_MANIFEST
        if manifest.exists():
            try:
                shards = json.loads(manifest.read_text())["shards"]
            except (json.JSONDecodeError, KeyError):
                shards = {}
            if shards:
                proc.send_signal(signal.SIGKILL)
                killed_after = len(shards)
                break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert 0 < killed_after < settings().chunks, "the capture finished before it could be killed"
    (folder / ".shard-00002.npz.abc.tmp").write_bytes(b"partial")  # what a kill mid-write leaves
    resumed = capture(tiny, folder, settings(), progress=False)
    assert [r.id for r in resumed.records] == [r.id for r in calib.records]
    assert len({r.id for r in resumed.records}) == len(resumed.records)
    assert resumed.sha256 == calib.sha256  # the same data, shard for shard
    assert not list(folder.glob(".shard-*"))


def test_capture_without_deepcache_graphs(tiny: Path, tmp_path: Path) -> None:
    """A folder without unet_deep/unet_shallow is captured without the cache run; the same settings on a
    folder with them capture it, and do not reuse the shards made without it."""
    trimmed = without_graphs(tiny, tmp_path / "trimmed", CACHE_GRAPHS)
    small = settings(samples=2, per_prompt=1)  # two prompts, one step each: what is captured, not how
    folder = tmp_path / "set"
    old = capture(trimmed, folder, small, progress=False)
    assert old.settings["cache"] is False and {r.stream for r in old.records} == {"whole", "propagation"}
    logged: list[str] = []
    new = capture(tiny, folder, small, progress=False, log=logged.append)
    assert any("replaced" in m for m in logged), logged
    assert new.settings["cache"] is True and {r.graph for r in new.records if r.stream == "cache"} == {
        "unet_deep",
        "unet_shallow",
    }
    assert new.settings["key"] != old.settings["key"]
    assert replace(small, cache=True).key() != replace(small, cache=False).key()
    with pytest.raises(EffdiffError, match="no fp32 unet_deep, unet_shallow graph to calibrate"):
        capture(trimmed, tmp_path / "forced", replace(small, cache=True), progress=False)


def test_int8_cli_quantizes_validates_and_runs(tiny: Path, tmp_path: Path) -> None:
    args = int8_args(tiny, 9)
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr
    assert "unet_decoder" in proc.stdout and "ok" in proc.stdout
    manifest = Manifest.read(tiny)
    # every UNet graph the folder has, DeepCache's included, each excluding the convolutions it holds
    kept = {
        "unet_encoder": ("^conv_in$",),
        "unet_decoder": ("^conv_out$",),
        "unet": ("^conv_in$", "^conv_out$"),
        "unet_deep": ("^conv_in$", "^conv_out$"),
        "unet_shallow": ("^conv_in$", "^conv_out$"),
    }
    for graph, patterns in kept.items():
        fp32, int8 = manifest.variant(graph, "fp32"), manifest.variant(graph, "int8")
        assert (tiny / f"{graph}.int8.onnx").is_file() and int8.file == f"{graph}.int8.onnx"
        assert int8.meta["source_variant"] == "fp32"
        assert int8.meta["source_sha256"] == sha256_file(tiny / fp32.file)
        assert int8.meta["mode"] == "static" and int8.meta["method"] == "minmax"
        assert int8.meta["calibration_sha256"] == CalibrationSet.read(tiny / "calibration").sha256
        assert int8.meta["qdq_check"]["ok"], int8.meta["qdq_check"]
        reasons = int8.meta["layers"]["reasons"]
        assert all(reasons.get(f"pattern {p}") == 1 for p in patterns), (graph, reasons)
        # held-out validation: within the sanity bound, and above zero (it is INT8); skip_00 is conv_in's
        # output, kept in float, so it matches exactly
        rel = {c.output: c.rel_l2 for c in int8.validation}
        assert rel and all(0 <= v < INT8_TOLERANCE for v in rel.values()) and max(rel.values()) > 0, rel
        assert int8.meta["validation_samples"] > 0 and int8.meta["calibration_samples"] > 0
        assert fp32.size_bytes / int8.size_bytes > 2.5, (graph, fp32.size_bytes, int8.size_bytes)
    # the runtime takes precision="int8", with and without propagation, close to fp32
    fp32_pipe, int8_pipe = Pipeline.load(tiny), Pipeline.load(tiny, precision="int8")
    assert int8_pipe.variants["unet"].name == "int8" and int8_pipe.variants["vae_decoder"].name == "fp32"
    assert all(int8_pipe.variants[g].name == "int8" for g in CACHE_GRAPHS)
    for schedule in ("none", KEYS, "cache:3"):
        want = fp32_pipe("a red circle", steps=10, propagation=schedule, seed=3)
        got = int8_pipe("a red circle", steps=10, propagation=schedule, seed=3)
        rel = float(np.linalg.norm(got.latents - want.latents) / np.linalg.norm(want.latents))
        assert 0 < rel < 0.2, (schedule, rel)  # INT8 ran (not 0), and stayed close to fp32
        value = psnr(np.asarray(got.images[0]), np.asarray(want.images[0]))
        assert value >= 30.0, f"{schedule}: int8 vs fp32 PSNR {value:.1f} dB"
    assert got.calls["unet_deep"] == 4 and got.calls["unet_shallow"] == 6
    # lean options keep weight pre-packing in the INT8 graphs (their packed weights replace the int8
    # initializers; without them every call packs again) and turn it off in float ones. They also keep
    # the INT8 graphs' fp16-stored float weights fp16, which leaves the quantized convolutions in NCHW
    # (ONNX Runtime moves them to NHWC kernels at ORT_ENABLE_ALL): not the same rounding, so the images
    # are held to INT8's bounds against fp32 and close to the resident INT8 ones, not equal to them
    lean_backend = OrtBackend(session_options=LEAN_OPTIONS)
    lean = Pipeline.load(tiny, precision="int8", backend=lean_backend, lean=True)
    lean_got = lean("a red circle", steps=10, propagation="cache:3", seed=3)
    rel = float(np.linalg.norm(lean_got.latents - want.latents) / np.linalg.norm(want.latents))
    assert 0 < rel < 0.2 and psnr(np.asarray(lean_got.images[0]), np.asarray(want.images[0])) >= 30.0
    to_int8 = float(np.linalg.norm(lean_got.latents - got.latents) / np.linalg.norm(got.latents))
    assert to_int8 < 0.05, to_int8
    options = {
        g: lean.open_graph(g).graph.session.get_session_options() for g in ("unet_deep", "vae_decoder")
    }
    assert options["vae_decoder"].get_session_config_entry("session.disable_prepacking") == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):
        options["unet_deep"].get_session_config_entry("session.disable_prepacking")
    # and keep the INT8 graphs' fp16-stored float weights fp16 (no constant folding, no layout level)
    assert lean.variants["unet_deep"].meta["float_weights"] == "fp16"
    assert str(options["unet_deep"].graph_optimization_level).endswith("ORT_ENABLE_EXTENDED")
    assert str(options["vae_decoder"].graph_optimization_level).endswith("ORT_ENABLE_ALL")
    # the same job again keeps what it made
    again = quantize_artifacts(
        tiny,
        QuantizeOptions(method="minmax"),
        CaptureSettings(prompts=tuple(default_prompts()), samples=9, steps=10, propagation=KEYS),
        progress=False,
    )
    assert all(r.skipped for r in again.results) and len(again.results) == 5
    assert (
        Manifest.read(tiny).variant("unet", "int8").recipe_key == manifest.variant("unet", "int8").recipe_key
    )
    from effdiff.bench.harness import BenchSettings, parse_configs, run_bench

    configs = {c.name: c for c in parse_configs(["int8", "fd+int8", "cache:3+int8"], "ddim", 50)}
    assert configs["int8"].precision.value == "int8" and not configs["int8"].propagation.propagates
    assert configs["fd+int8"].propagation.propagates
    assert configs["cache:3+int8"].propagation.caches and configs["cache:3+int8"].precision.value == "int8"
    # the bench runs cache:3+int8 beside cache:3, and its images stay close to cache:3's
    bench = BenchSettings(prompts=["a green star"], steps=10, repeat=1, warmup=0)
    report = run_bench(tiny, parse_configs(["cache:3", "cache:3+int8"], "ddim", 10), bench, progress=False)
    rows = {r.name: r for r in report.rows}
    assert rows["cache:3+int8"].components["unet_shallow"].median > 0
    got, want = (np.asarray(report.images[n][0], np.float64) for n in ("cache:3+int8", "cache:3"))
    assert np.isfinite(got).all() and psnr(got, want) >= 30.0, psnr(got, want)
    # a folder whose INT8 variants predate DeepCache's graphs: refused in one line saying how to make them
    older = without_graphs(tiny, tmp_path / "older", CACHE_GRAPHS, variant="int8")
    args = ["effdiff", "bench", "--artifacts", str(older), "--configs", "cache:3+int8", "--steps", "10"]
    assert_one_line_error(run(*args, "--out", str(tmp_path / "r")), "effdiff-export int8")


def test_killed_quantization_leaves_no_complete_looking_file(sd1_artifacts: Path, tmp_path: Path) -> None:
    art = tmp_path / "a"
    shutil.copytree(sd1_artifacts, art)
    args = [str(Path(sys.executable).parent / "effdiff-export"), *int8_args(art, 6)[1:]]
    args += ["--graphs", "unet_encoder,unet_decoder"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, killed = time.time() + 120, False
    while time.time() < deadline and proc.poll() is None:
        if list(art.glob(".tmp-int8-unet_decoder-*/*")):  # the second graph is being written
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed, "the quantization finished before it could be killed"
    manifest = Manifest.read(art)
    recorded = {v.file for vs in manifest.graphs.values() for v in vs.values()}
    for f in art.glob("*.int8.onnx*"):
        assert f.name in recorded, f"{f.name} looks complete but the manifest does not know it"
    assert "int8" not in manifest.variants("unet_decoder") and "int8" in manifest.variants("unet_encoder")
    proc = run(*[a if i else "effdiff-export" for i, a in enumerate(args)])  # the lock died with it
    assert proc.returncode == 0, proc.stderr
    assert "int8" in Manifest.read(art).variants("unet_decoder") and "(kept)" in proc.stdout
    assert not list(art.glob(".tmp-int8-*"))


def test_layer_policy_targets_and_modes(tiny: Path, calib: CalibrationSet) -> None:
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(tiny / "unet_encoder.onnx"))
    default = plan_layers(model, ("Conv", "MatMul", "Gemm"), QuantizeOptions().exclude)
    reasons = default.summary()["reasons"]
    assert reasons["pattern ^conv_in$"] == 1 and reasons["pattern time_embedding"] == 2
    assert reasons["no constant weight (activation x activation)"] > 0  # attention scores stay float
    no_attn = plan_layers(model, ("Conv", "MatMul", "Gemm"), (*QuantizeOptions().exclude, r"attn\d"))
    assert len(no_attn.quantize) < len(default.quantize)
    # the ONNX Runtime CPU layout quantizes outputs too: not what TensorRT fuses, and the check says so
    cpu = tiny.parent / "cpu"
    shutil.copytree(tiny, cpu, dirs_exist_ok=True)
    s = settings()
    report = quantize_artifacts(
        cpu, QuantizeOptions(target="cpu", method="minmax", graphs=("unet_encoder",)), s, calib.folder, False
    )
    assert report.results[0].qdq is None
    assert not check_qdq(onnx.load(str(cpu / "unet_encoder.int8.onnx"))).ok
    # dynamic: MatMul/Gemm only, no calibration, validated all the same
    report = quantize_artifacts(
        cpu, QuantizeOptions(mode="dynamic", graphs=("unet_decoder",)), s, calib.folder, False
    )
    ops = {n.op_type for n in onnx.load(str(cpu / "unet_decoder.int8.onnx")).graph.node}
    assert "DynamicQuantizeLinear" in ops and "QuantizeLinear" not in ops
    assert report.results[0].comparisons and report.results[0].calibration_samples == 0
    # ablation (a): random calibration inputs give a worse decoder than the captured ones
    rand = quantize_artifacts(
        cpu,
        QuantizeOptions(method="minmax", source="random", graphs=("unet_decoder",)),
        s,
        calib.folder,
        False,
    )
    real = quantize_artifacts(
        cpu, QuantizeOptions(method="minmax", graphs=("unet_decoder",)), s, calib.folder, False
    )
    assert rand.results[0].worst_rel_l2 > real.results[0].worst_rel_l2


def test_float_layers_stored_as_fp16(tiny: Path, calib: CalibrationSet) -> None:
    """The layers kept in float are stored as fp16 behind a Cast by default: smaller on disk, still
    computed in fp32, and no less accurate than the fp32-stored graph beyond a hair."""
    onnx = pytest.importorskip("onnx")
    folder = tiny.parent / "float-weights"
    shutil.copytree(tiny, folder, dirs_exist_ok=True)
    results, casts = {}, {}
    for stored in ("fp32", "fp16"):
        options = QuantizeOptions(method="minmax", graphs=("unet_decoder",), float_weights=stored)
        results[stored] = quantize_artifacts(folder, options, settings(), calib.folder, False).results[0]
        model = onnx.load(str(folder / "unet_decoder.int8.onnx"))
        halves = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
        casts[stored] = [n for n in model.graph.node if n.op_type == "Cast" and n.input[0] in halves]
        readers = {n.op_type for n in model.graph.node for c in casts[stored] if c.output[0] in n.input}
        assert readers <= {"Conv", "MatMul", "Gemm"}, readers
        assert Manifest.read(folder).variant("unet_decoder", "int8").meta["float_weights"] == stored
    assert not casts["fp32"] and casts["fp16"]  # conv_out and the shortcut convolutions at least
    assert results["fp16"].int8_bytes < results["fp32"].int8_bytes
    fp16, fp32 = results["fp16"].worst_rel_l2, results["fp32"].worst_rel_l2
    # no worse than 5 % (it can come out better: the INT8 kernels' rounding differs by CPU, and on an
    # AVX-512 VNNI machine fp16 storage measured 0.0171 against 0.0183)
    assert fp16 <= 1.05 * fp32, f"rel L2 {fp16:.5f} with fp16 storage vs {fp32:.5f}"
    with pytest.raises(EffdiffError, match="float_weights"):
        QuantizeOptions(float_weights="bf16")


def test_int8_errors(tiny: Path, calib: CalibrationSet, tmp_path: Path) -> None:
    assert_one_line_error(
        run("effdiff-export", "int8", "--artifacts", str(tiny), "--calib-prompts", str(tmp_path / "no.txt")),
        "does not exist",
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    assert_one_line_error(
        run("effdiff-export", "int8", "--artifacts", str(tiny), "--calib-prompts", str(empty)), "no prompts"
    )
    (tmp_path / "p.txt").write_text("a\n\n b \n# comment\n")
    assert read_prompts(tmp_path / "p.txt") == ["a", "b"]
    # artifacts without the graphs to quantize
    bare = tmp_path / "bare"
    shutil.copytree(tiny, bare)
    data = json.loads((bare / "manifest.json").read_text())
    del data["graphs"]["unet_decoder"], data["graphs"]["unet_deep"]
    (bare / "manifest.json").write_text(json.dumps(data))
    assert_one_line_error(run("effdiff-export", "int8", "--artifacts", str(bare)), "no fp32 unet_decoder")
    assert_one_line_error(
        run("effdiff-export", "int8", "--artifacts", str(bare), "--graphs", "unet,unet_deep"),
        "no fp32 unet_deep graph to quantize",
    )
    # external data reached through a hard link: onnx's loader refuses it, so the CLI says so up front
    linked = tmp_path / "linked"
    shutil.copytree(tiny, linked, ignore=shutil.ignore_patterns("calibration"))  # earlier tests' set
    data_file = linked / "unet_encoder.onnx.data"
    data_file.write_bytes(b"weights")
    os.link(data_file, tmp_path / "elsewhere.data")
    data = json.loads((linked / "manifest.json").read_text())
    files = data["graphs"]["unet_encoder"]["variants"]["fp32"]["files"]
    files[data_file.name] = {"size": 7, "sha256": sha256_file(data_file)}
    (linked / "manifest.json").write_text(json.dumps(data))
    assert_one_line_error(
        run("effdiff-export", "int8", "--artifacts", str(linked)), "unet_encoder.onnx.data has 2 hard links"
    )
    assert not (linked / "calibration").exists()  # refused before the calibration run
    with pytest.raises(EffdiffError, match=r"INT8 graphs must be among .* got unet_mid"):
        QuantizeOptions(graphs=("unet", "unet_mid"))
    # --precision int8 without INT8 variants; bench configurations likewise
    plain = tmp_path / "plain"
    shutil.copytree(tiny, plain)
    data = json.loads((plain / "manifest.json").read_text())
    for graph in data["graphs"].values():
        graph["variants"].pop("int8", None)
    (plain / "manifest.json").write_text(json.dumps(data))
    assert_one_line_error(
        run(
            "effdiff",
            "generate",
            "--artifacts",
            str(plain),
            "--prompt",
            "a",
            "--precision",
            "int8",
            "--out",
            str(tmp_path / "o.png"),
        ),
        "no int8 variant",
    )
    # calibration that yields nothing, and inputs that do not fit the graph
    spec = Manifest.read(tiny).specs()["unet_encoder"]
    names = spec.input_names
    with pytest.raises(EffdiffError, match="no calibration samples"):
        check_feeds("unet_encoder", spec, names, [])
    good = next(calib.feeds(calib.select("propagation", "unet_encoder", False)))
    with pytest.raises(EffdiffError, match="expected float32"):
        check_feeds("unet_encoder", spec, names, [{**good, "sample": good["sample"][:, :2]}])
    with pytest.raises(EffdiffError, match="has inputs"):
        check_feeds("unet_encoder", spec, names, [{**good, "latents": good["sample"]}])
    with pytest.raises(EffdiffError, match="samples must be >= 1"):
        CaptureSettings(prompts=PROMPTS, samples=0)
    with pytest.raises(EffdiffError, match="unknown method"):
        QuantizeOptions(method="mse")
