"""KB builds on Ray: a real local cluster started here (2 CPUs, no dashboard), tiny-sd1 shards built by
Ray actors. Faults are real: an actor's worker process is SIGKILLed after its first checkpoint (Ray
restarts it and re-sends its shard, which resumes), and a driver process is SIGKILLed part-way (a
re-run with --resume skips the finished shards). The result must equal a single-process build.
Without ray installed, `--ray` names the extra in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from effdiff.errors import EffdiffError
from effdiff.kb.build import IndexOptions, build_kb
from effdiff.kb.distributed import SHARDS, RayOptions, build_kb_ray, part_name
from effdiff.kb.evaluate import eval_index, kb_info
from effdiff.kb.store import KB_MANIFEST, PARTIAL, BuildSettings, KnowledgeBase

from .test_cli import BIN, assert_one_line_error, run

PROMPTS = [
    f"a {c} {k} on a {b} background"
    for c in ("red", "blue", "green", "white")
    for k in ("cat", "dog", "fox")
    for b in ("white", "black")
]  # 24 prompts x 2 seeds = 48 entries
SEEDS = (0, 1)
SETTINGS = BuildSettings(steps=8, guidance=5.0, key_step=2, value_steps=(4, 6), seeds=SEEDS)
SMALL = IndexOptions("PCA16,PQ4x4", "PQ4x4")
EVERY, BATCH = 4, 2  # small checkpoints, so a kill lands between two of them
QUIET = {"progress": False, "log": lambda _m: None}


@pytest.fixture(scope="module")
def cluster() -> str:
    """A local Ray cluster for this module; its address, for drivers in other processes."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'effdiff[distributed]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def local_kb(sd1_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same prompts and seeds built in one process: what every distributed build must equal."""
    out = tmp_path_factory.mktemp("kb") / "local"
    build_kb(sd1_artifacts, PROMPTS, out, SETTINGS, SMALL, checkpoint_every=EVERY, batch=BATCH, **QUIET)
    return out


def assert_same_kb(got: Path, want: Path) -> None:
    """Every entry exactly once, in order; keys and values equal within float16 rounding (the actors
    run ONNX Runtime on 1 thread, the local build on 2); `kb info` and `kb eval` agree."""
    a, b = KnowledgeBase.open(got), KnowledgeBase.open(want)
    assert [tuple(e) for e in a.entries.tolist()] == [(p, s) for p in range(len(PROMPTS)) for s in SEEDS]
    for name in ("keys", "values", "prompt_keys"):
        x, y = np.asarray(getattr(a, name), np.float32), np.asarray(getattr(b, name), np.float32)
        err = np.abs(x - y) - 2**-10 * np.abs(y)  # one float16 step, relative
        assert err.max() <= 1e-6, f"{name}: max difference {np.abs(x - y).max():.2e} beyond float16 rounding"
    info_a, info_b = kb_info(got, checksum=True), kb_info(want)
    assert info_a.manifest.entries == info_b.manifest.entries == 48
    assert info_a.manifest.kind == "kb" and info_a.manifest.tie == info_b.manifest.tie
    same = [line for line in info_b.lines() if "threshold" not in line and "value error" not in line]
    assert [line for line in info_a.lines() if line in same] == same, "kb info differs"
    for space in ("latent", "prompt"):
        ea, eb = eval_index(a, 48, space), eval_index(b, 48, space)
        assert (ea.recall_at_1, ea.recall_at_10) == (eb.recall_at_1, eb.recall_at_10), space
    ta = a.manifest.adaptive["latent"]["thresholds"]
    tb = b.manifest.adaptive["latent"]["thresholds"]
    assert ta.keys() == tb.keys() and all(abs(ta[k] - tb[k]) <= 1e-2 * tb[k] for k in tb), (ta, tb)


def ray_worker_holding(lock: Path) -> int | None:
    """The pid of the Ray worker process that holds `lock` open (the actor building that shard)."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "ShardBuilder" in " ".join(proc.info["cmdline"] or []) and any(
                f.path == str(lock) for f in proc.open_files()
            ):
                return proc.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_actor_killed_mid_shard_resumes_from_its_checkpoint(
    cluster: str, sd1_artifacts: Path, local_kb: Path, tmp_path: Path
) -> None:
    out = tmp_path / "kb"
    part = out / SHARDS / part_name(0, 2)
    killed: list[int] = []

    def kill_after_first_checkpoint() -> None:
        deadline = time.time() + 120
        pid = None
        while time.time() < deadline and not (part / KB_MANIFEST).exists():
            pid = pid or ray_worker_holding(part / ".effdiff.lock")
            if pid and list((part / PARTIAL).glob("chunk-*.npz")):
                os.kill(pid, signal.SIGKILL)  # as a node or process failure would: no clean-up runs
                killed.append(pid)
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    watcher.start()
    report = build_kb_ray(
        sd1_artifacts,
        PROMPTS,
        out,
        SETTINGS,
        SMALL,
        RayOptions(shards=2, max_restarts=2),
        checkpoint_every=EVERY,
        batch=BATCH,
        **QUIET,
    )
    watcher.join()
    assert killed, "shard 0 finished before its actor could be killed"
    first = next(r for r in report.shards if r.shard == 0)
    assert first.pid != killed[0], "shard 0 was finished by the restarted actor"
    assert first.resumed >= EVERY and first.resumed % EVERY == 0, (
        "it resumed from the killed one's checkpoints"
    )
    assert first.resumed + first.generated == 24
    assert report.kb.entries == 48 and report.actors == 2 and report.shard_count == 2
    assert not (out / SHARDS).exists(), "parts are removed once the merged kb.json is written"
    assert_same_kb(out, local_kb)


def test_killed_driver_resumes_and_skips_finished_shards(
    cluster: str, sd1_artifacts: Path, local_kb: Path, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "kb"
    args = [
        "effdiff", "kb", "build", "--artifacts", str(sd1_artifacts), "--prompts", str(prompts),
        "--out", str(out), "--seeds", "0,1", "--steps", "8", "--guidance", "5", "--key-step", "2",
        "--value-steps", "4,6", "--index", "PCA16,PQ4x4", "--prompt-index", "PQ4x4",
        "--checkpoint-every", str(EVERY), "--batch", str(BATCH), "--quiet", "--ray", cluster,
    ]  # fmt: skip
    driver = subprocess.Popen(
        [str(BIN / args[0]), *args[1:], "--shards", "3", "--actors", "1"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and driver.poll() is None:
        if list((out / SHARDS).glob(f"part-*/{KB_MANIFEST}")):  # one shard finished, others not yet
            break
        time.sleep(0.01)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert not (out / KB_MANIFEST).exists(), "the build finished before its driver could be killed"
    finished = len(list((out / SHARDS).glob(f"part-*/{KB_MANIFEST}")))
    assert 1 <= finished < 3
    assert_one_line_error(run(*args), "pass --resume")
    assert_one_line_error(run(*args, "--resume", "--shards", "2"), "has 3 shards, not 2")
    resumed = run(*args, "--resume")  # shard count from the unfinished build's plan
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {finished} of 3 shards finished earlier" in resumed.stderr, resumed.stderr
    assert f"3 shards on {min(2, 3 - finished)} Ray actors" in resumed.stdout, resumed.stdout
    assert_same_kb(out, local_kb)


def test_bad_ray_options_are_one_line(cluster: str, sd1_artifacts: Path, tmp_path: Path) -> None:
    with pytest.raises(EffdiffError, match="some would be empty"):
        build_kb_ray(sd1_artifacts, PROMPTS[:1], tmp_path / "k", SETTINGS, SMALL, RayOptions(shards=3))
    with pytest.raises(EffdiffError, match="shards must be an integer >= 1"):
        build_kb_ray(sd1_artifacts, PROMPTS, tmp_path / "k", SETTINGS, SMALL, RayOptions(shards=0))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    build = ["effdiff", "kb", "build", "--artifacts", str(sd1_artifacts), "--prompts", str(prompts)]
    closed = run(*build, "--out", str(tmp_path / "k"), "--ray", "127.0.0.1:1")  # nothing listens there
    assert_one_line_error(closed, "cannot reach a Ray cluster at '127.0.0.1:1'")
    local = tmp_path / "local"
    (local / PARTIAL).mkdir(parents=True)
    with pytest.raises(EffdiffError, match="unfinished local build; resume it without --ray"):
        build_kb_ray(sd1_artifacts, PROMPTS, local, SETTINGS, SMALL, resume=True)


def test_without_ray_the_option_names_its_extra(tmp_path: Path) -> None:
    """ray hidden from the import system: `--ray` fails in one line naming the extra; the rest works."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    code = f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "ray":
                    raise ImportError(f"No module named {{name!r}} (blocked by test)")
        sys.meta_path.insert(0, Block())
        from effdiff.cli import main
        main(["kb", "build", "--artifacts", "/nonexistent", "--prompts", {str(prompts)!r},
              "--out", {str(tmp_path / "k")!r}, "--ray"])
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert_one_line_error(proc, "pip install 'effdiff[distributed]'")
    build = ["effdiff", "kb", "build", "--artifacts", "/x", "--prompts", str(prompts), "--out", "/y"]
    assert_one_line_error(run(*build, "--shards", "2"), "--shards and --actors need --ray")
