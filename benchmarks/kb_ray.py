"""KB builds on Ray against one process, on this machine: (1) the same prompts built by one process and
by 2 Ray actors on a local cluster (the issue's goal: Ray no slower than 1.15x); (2) per-shard throughput
and merge time for 1, 2, 4, 8 shards; (3) an estimate for a 1M-entry KB on N workers from the measured
per-entry cost; (4) merge of 8 parts of 10,000 synthetic entries each: time, peak RAM, and recall of
the merged KB's index against the same entries indexed in one go.

  HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/kb_ray.py --work runs/kb-ray

Not run in CI. Timings on a shared 2-core machine are rough: the CPU flags and the load average are
printed beside every figure, and only ratios measured in one run are compared. Models: tiny-sd1 (the
tests' model, exported here) by default, or `--artifacts` of any export (e.g. the reference model).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from effdiff.kb.build import IndexOptions, build_kb
from effdiff.kb.store import BuildSettings

SETTINGS = BuildSettings(steps=50, guidance=7.5, key_step=10, value_steps=(20, 25, 30), seeds=(0,))
SILENT = {"progress": False, "log": lambda _m: None}


def machine() -> str:
    flags = sorted(set(Path("/proc/cpuinfo").read_text().split()) & {"avx2", "avx512f", "avx512_vnni"})
    return f"CPU flags: {' '.join(flags) or 'none of avx2/avx512'}; cores {os.cpu_count()}"


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def prompts(n: int) -> list[str]:
    """`n` distinct prompts: 400 combinations, then the same with a variant number."""
    colours = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
    things = ("cat", "dog", "fox", "bird", "car", "house", "tree", "boat", "chair", "cup")
    places = ("on a beach", "in a forest", "in a city", "on snow", "indoors")
    combos = [f"a {c} {t} {p}" for p in places for t in things for c in colours]
    return [combos[i % 400] + (f", variant {i // 400}" if i >= 400 else "") for i in range(n)]


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


# ---------------------------------------------------------------- (1) and (2): real builds


def real_builds(args: argparse.Namespace, artifacts: Path, work: Path) -> dict:
    import ray

    from effdiff.kb.distributed import RayOptions, build_kb_ray

    res: dict = {"prompts": args.prompts, "settings": SETTINGS.to_json()}
    ps = prompts(args.prompts)
    small = IndexOptions(args.index, args.prompt_index)  # a few hundred entries: small codebooks
    _, res["cluster_start_s"] = timed(
        ray.init, num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error"
    )
    single, ray_s = [], []
    for r in range(args.repeat):  # alternate, so a change in the machine's load hits both
        folder = work / f"single-{r}"
        shutil.rmtree(folder, ignore_errors=True)
        rep, t = timed(build_kb, artifacts, ps, folder, SETTINGS, small, batch=args.batch, **SILENT)
        single.append(t)
        print(f"single process, {rep.entries} entries: {t:.1f} s ({load()})", flush=True)
        folder = work / f"ray-{r}"
        shutil.rmtree(folder, ignore_errors=True)
        opts = RayOptions(shards=2, actors=2)
        rep, t = timed(build_kb_ray, artifacts, ps, folder, SETTINGS, small, opts, batch=args.batch, **SILENT)
        ray_s.append(t)
        print(f"Ray, 2 actors, 2 shards: {t:.1f} s, of which merge {rep.merge_seconds:.1f} s ({load()})")
    res["single_s"], res["ray_s"] = single, ray_s
    res["ratio_ray_over_single"] = statistics.median(r / s for r, s in zip(ray_s, single, strict=True))
    sweep = []
    for n in (1, 2, 4, 8):
        folder = work / f"sweep-{n}"
        shutil.rmtree(folder, ignore_errors=True)
        opts = RayOptions(shards=n, actors=2)
        rep, t = timed(build_kb_ray, artifacts, ps, folder, SETTINGS, small, opts, batch=args.batch, **SILENT)
        row = {
            "shards": n,
            "actors": rep.actors,
            "total_s": t,
            "shards_s": rep.build_seconds,
            "merge_s": rep.merge_seconds,
            "per_shard_entries_per_s": [round(s.entries_per_s, 2) for s in rep.shards],
            "per_shard_s": [round(s.seconds, 2) for s in rep.shards],
            "load": load(),
        }
        sweep.append(row)
        print(json.dumps(row), flush=True)
    res["sweep"] = sweep
    ray.shutdown()
    return res


# ---------------------------------------------------------------- (4): merge of synthetic parts


def synthetic_arrays(parts: int, rows: int, dim: int) -> list[dict[str, np.ndarray]]:
    """Each part's arrays, keys shaped like real ones (benchmarks/kb_scale.py's generator: starting
    noise + a low-rank prompt signal + noise), 4 seeds per prompt, 3 value steps, 32-d prompt keys."""
    sys.path.insert(0, str(Path(__file__).parent))
    from kb_scale import keys_of, structure

    from effdiff.kb.store import ARRAYS

    struct = structure(dim)
    out = []
    for i in range(parts):
        ids = np.arange(i * rows, (i + 1) * rows)
        keys = keys_of(i, rows, dim, struct)
        noise = np.random.default_rng(i).standard_normal((rows, 3, dim), dtype=np.float32)
        values = keys[:, None] * np.float32(0.9) + np.float32(0.05) * noise
        centres = struct[2]
        out.append(
            {
                ARRAYS[0]: np.stack([ids // 4, ids % 4], 1).astype(np.int64),
                ARRAYS[1]: keys.astype(np.float16),
                ARRAYS[2]: values.astype(np.float16),
                ARRAYS[3]: centres[(ids // 4) % len(centres)].astype(np.float16),
            }
        )
    return out


def write_part(part: Path, arrays: dict[str, np.ndarray], i: int, n: int, start: int, total: int) -> Path:
    """A folder exactly as `kb build --shard i/n` writes it (arrays, prompts, kb.json of kind part)."""
    from effdiff.artifacts import atomic_path
    from effdiff.kb.build import prompts_sha256
    from effdiff.kb.store import PROMPTS, KBManifest, record_files

    part.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        with atomic_path(part / name) as tmp, tmp.open("wb") as fh:
            np.save(fh, arr)
    names = [f"synthetic prompt {k}" for k in range(total // 4)]
    (part / PROMPTS).write_text("\n".join(names))
    dim = arrays["keys.npy"].shape[1]
    side = round((dim // 4) ** 0.5)
    tie = {"model": "synthetic", "source_hash": "0" * 64, "precision": "fp32", "unet_files": {}, "hash": "s"}
    KBManifest(
        kind="part",
        tie=tie,
        settings=BuildSettings(
            steps=50, guidance=7.5, key_step=10, value_steps=(20, 25, 30), seeds=(0, 1, 2, 3)
        ),
        latent_shape=(4, side, side),
        prompts_sha256=prompts_sha256(names),
        num_prompts=len(names),
        entries=len(arrays["keys.npy"]),
        entry_range=(start, start + len(arrays["keys.npy"])),
        total_entries=total,
        shard=(i, n),
        files=record_files(part, [PROMPTS, *arrays]),
    ).write(part)
    return part


def merge_child(args: argparse.Namespace) -> None:
    """(internal) one merge in a fresh process, so its peak RSS is the merge's own; prints JSON."""
    from effdiff.kb.build import merge_kb
    from effdiff.kb.evaluate import eval_index
    from effdiff.kb.store import KnowledgeBase

    parts = [Path(p) for p in args.merge_child.split(",")]
    rep, t = timed(merge_kb, parts, Path(args.merge_out), IndexOptions(), lambda _m: None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ev = eval_index(KnowledgeBase.open(args.merge_out), queries=500)
    print(json.dumps({"seconds": t, "peak_rss_mib": peak, "recall_at_1": ev.recall_at_1,
                      "recall_at_10": ev.recall_at_10, "recall_at_1_codes": ev.recall_at_1_codes,
                      "recall_at_10_codes": ev.recall_at_10_codes, "entries": rep.entries}))  # fmt: skip


def synthetic_merge(args: argparse.Namespace, work: Path) -> dict:
    folder = work / "synthetic"
    shutil.rmtree(folder, ignore_errors=True)
    n, rows = args.synthetic_parts, args.synthetic_rows
    arrays, t = timed(synthetic_arrays, n, rows, args.dim)
    parts = [write_part(folder / f"part-{i}", a, i, n, i * rows, n * rows) for i, a in enumerate(arrays)]
    joined = {name: np.concatenate([a[name] for a in arrays]) for name in arrays[0]}
    del arrays
    one = [write_part(folder / "one", joined, 0, 1, 0, n * rows)]  # the same entries as one part
    del joined
    print(f"made {n} synthetic parts of {rows} entries in {t:.1f} s", flush=True)
    res = {"parts": len(parts), "rows_per_part": args.synthetic_rows, "dim": args.dim}
    for what, src, dst in (("merged", parts, folder / "merged"), ("one_go", one, folder / "one-kb")):
        cmd = [sys.executable, __file__, "--merge-child", ",".join(map(str, src)), "--merge-out", str(dst)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"merge child failed: {proc.stderr.strip().splitlines()[-1]}")
        res[what] = json.loads(proc.stdout.strip().splitlines()[-1])
        res[what]["load"] = load()
        print(what, json.dumps(res[what]), flush=True)
    a, b = (np.load(folder / d / "keys.npy", mmap_mode="r") for d in ("merged", "one-kb"))
    res["same_keys"] = bool(np.array_equal(a, b))
    for part in [*parts, *one]:
        shutil.rmtree(part)
    return res


# ---------------------------------------------------------------- (3): estimate


def estimate(res: dict, synth: dict | None, target: int = 1_000_000) -> list[str]:
    lines = []
    rows = [r for r in res.get("sweep", []) if r["shards"] >= r["actors"]]
    if rows:
        per_actor = statistics.median(x for r in rows for x in r["per_shard_entries_per_s"])
        lines.append(
            f"measured: {per_actor:.2f} entries/s per 1-CPU actor (tiny model, {SETTINGS.steps} steps, "
            f"{SETTINGS.value_steps[-1]} run per entry); 1M entries on N such actors: "
            f"{target / per_actor / 3600:.0f}/N hours"
        )
    # the GPU figure is an assumption from FACTS.md, not a measurement here
    step_s = 1.1 / 50  # ONNX Runtime SD1.5 512x512 on an A100: 1.1 s for 50 steps (guided, batch 1)
    gpu_h = target * SETTINGS.value_steps[-1] * step_s / 3600
    lines.append(
        f"assumed: SD1.5 at 512x512 on one A100 with ONNX Runtime, {step_s * 1e3:.0f} ms per guided step "
        f"(1.1 s / 50 steps, batch 1, no batching gain), 30 steps per entry: {gpu_h:.0f} GPU-hours for 1M "
        f"entries, i.e. {gpu_h:.0f}/N hours on N GPUs; disk 128 KiB per entry (float16 key + 3 values of "
        "16,384-d) = 122 GiB, shards and merged KB both held until the merge ends"
    )
    if synth:
        per = synth["merged"]["seconds"] / (synth["parts"] * synth["rows_per_part"])
        full_h = per * target * 16384 / synth["dim"] / 3600
        lines.append(
            f"merge: {per * 1e3:.2f} ms per {synth['dim']}-d entry measured at "
            f"{synth['parts'] * synth['rows_per_part']:,}; linear in entries x dim beyond the fixed "
            f"index training ({target:,} x 16,384-d: about {full_h:.1f} h "
            "on one such machine, an upper bound: copying is disk-bound, training is on 100k samples)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/kb-ray"))
    parser.add_argument("--artifacts", type=Path, help="an export (default: tiny-sd1, exported into --work)")
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--index", default="PCA64,PQ16x4", help="faiss factory of the real builds' keys")
    parser.add_argument("--prompt-index", default="PQ16x4")
    parser.add_argument("--repeat", type=int, default=1, help="single/Ray pairs, alternated")
    parser.add_argument("--synthetic-parts", type=int, default=8)
    parser.add_argument("--synthetic-rows", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=1024, help="key width of the synthetic entries (4xhxw)")
    parser.add_argument("--skip-builds", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--merge-child", help=argparse.SUPPRESS)
    parser.add_argument("--merge-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.merge_child:
        merge_child(args)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    print(machine(), "|", load(), flush=True)
    res: dict = {"machine": machine(), "load_start": load()}
    if not args.skip_builds:
        artifacts = args.artifacts
        if artifacts is None:
            artifacts = args.work / "tiny-sd1"
            if not (artifacts / "manifest.json").exists():
                from effdiff.export.onnx import export_onnx

                export_onnx("tiny-sd1", artifacts, progress=False)
        res["builds"] = real_builds(args, artifacts, args.work)
    if not args.skip_synthetic:
        res["synthetic_merge"] = synthetic_merge(args, args.work)
    res["load_end"] = load()
    res["estimate"] = estimate(res.get("builds", {}), res.get("synthetic_merge"))
    (args.work / "kb_ray.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    for line in res["estimate"]:
        print(line)


if __name__ == "__main__":
    main()
