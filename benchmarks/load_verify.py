"""What integrity checking costs at load: the stamp check every load does, against opening the sessions
it guards, and the time of a full verification (every file hashed).

  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/load_verify.py --artifacts artifacts/sd15-arch

Per graph: the quick check (`check_files`, which compares each file's size, mtime, ctime and inode
with the verification stamp and hashes only files that changed) and the session creation it precedes,
alternated over `--repeat` rounds so drift touches both alike. The overhead is the checks' share of
the load. Then `effdiff verify`'s full pass. Prints CPU flags and load average beside the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from effdiff.artifacts import Manifest, check_files, verify_artifacts
from effdiff.runtime.backends import get_backend


def cpu_line() -> str:
    flags = sorted(set(Path("/proc/cpuinfo").read_text().split()) & {"avx2", "avx512f", "avx512_vnni"})
    return f"CPU flags: {' '.join(flags)}; {os.cpu_count()} cores; load {os.getloadavg()[0]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--graphs", default="text_encoder,unet_encoder,unet_decoder,vae_decoder")
    args = parser.parse_args()
    print(cpu_line(), flush=True)
    folder = args.artifacts
    manifest = Manifest.read(folder)
    backend = get_backend("ort")
    graphs = [g for g in args.graphs.split(",") if g]
    start = time.perf_counter()
    report = verify_artifacts(folder, full=True)  # also (re)writes the stamp the quick checks read
    full_s = time.perf_counter() - start
    size = sum(
        r.size for g in manifest.graphs for v in manifest.variants(g).values() for r in v.files.values()
    )
    print(f"full verification: {full_s:.1f} s for {size / 2**30:.2f} GiB ({report.ok})", flush=True)
    check: dict[str, list[float]] = {g: [] for g in graphs}
    session: dict[str, list[float]] = {g: [] for g in graphs}
    for _ in range(args.repeat):
        for g in graphs:
            variant = manifest.choose(g, "fp32")
            t = time.perf_counter()
            check_files(folder, variant.files)
            check[g].append(time.perf_counter() - t)
            t = time.perf_counter()
            graph = backend.open(folder / variant.file, manifest.spec(g, variant))
            session[g].append(time.perf_counter() - t)
            del graph
    print("| graph | stamp check ms (median) | session creation s (median) | overhead |")
    print("|---|---|---|---|")
    for g in graphs:
        c, s = statistics.median(check[g]), statistics.median(session[g])
        print(f"| {g} | {c * 1e3:.2f} | {s:.2f} | {100 * c / s:.3f} % |")
    total_c = sum(statistics.median(check[g]) for g in graphs)
    total_s = sum(statistics.median(session[g]) for g in graphs)
    share = 100 * total_c / total_s
    print(f"all: checks {total_c * 1e3:.1f} ms against {total_s:.1f} s of sessions: {share:.3f} %")
    print(cpu_line())


if __name__ == "__main__":
    main()
