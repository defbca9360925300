"""The knowledge base's index at scale: 1,000,000 synthetic keys of SD1.5's key-step latent size
(4x64x64 = 16,384-d), built, stored, memory-mapped and queried on this machine.

  HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/kb_scale.py --out runs/kb-scale

What is synthetic and why: 1,000,000 real SD1.5 trajectories are out of reach on 2 CPU cores, and their
float16 keys alone would be 31 GiB. Keys are generated in chunks from fixed seeds instead, with the
structure real keys have at the key step: each entry is one of 64 starting noises (shared seeds),
plus a prompt signal from one of 4,096 prompt centres in a 32-d subspace with per-entry jitter, plus
small i.i.d. noise: key = z[seed] + U (m[prompt] + 0.3 j) + 0.1 e. Nothing of 16,384 floats per entry is
ever stored: PCA is trained on a 4,096-key sample (faiss uses the Gram matrix when there are fewer
samples than dimensions), IVF-PQ on 20,000 projected keys, then all keys are added chunk by chunk.
Re-ranking uses the 256-d PCA projections kept in float16 on disk (512 B per entry); ground truth is
exact search in the full 16,384-d space, computed by generating every chunk again.
The query process is a fresh subprocess, so its RSS is the index's and not the builder's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SEEDS, PROMPTS, RANK = 64, 4096, 32


def structure(dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(12345)
    z = rng.standard_normal((SEEDS, dim), dtype=np.float32)
    basis = np.linalg.qr(rng.standard_normal((dim, RANK)))[0].astype(np.float32) * np.sqrt(dim / RANK)
    centres = rng.standard_normal((PROMPTS, RANK), dtype=np.float32) * 0.5
    return z, basis, centres


def keys_of(chunk: int, rows: int, dim: int, parts: tuple[np.ndarray, ...], offset: int = 0) -> np.ndarray:
    """Rows [chunk*rows, (chunk+1)*rows) of the synthetic KB (or of the query set with `offset`)."""
    z, basis, centres = parts
    rng = np.random.default_rng([offset, chunk])
    seed = rng.integers(0, SEEDS, rows)
    prompt = rng.integers(0, PROMPTS, rows)
    coef = centres[prompt] + 0.3 * rng.standard_normal((rows, RANK), dtype=np.float32) * 0.5
    out = rng.standard_normal((rows, dim), dtype=np.float32)
    out *= 0.1
    out += z[seed]
    out += coef @ basis.T
    return out


def rss() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon", "RssFile", "VmRSS")):
            name, value = line.split(":")
            fields[name] = int(value.split()[0]) / 1024  # MiB
    return fields


def query_process(args: argparse.Namespace) -> None:
    """Open the index memory-mapped read-only, answer the queries one at a time, print JSON."""
    import faiss

    faiss.omp_set_num_threads(1)
    out = Path(args.out)
    before = rss()
    t0 = time.perf_counter()
    index = faiss.read_index(str(out / "index.faiss"), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    faiss.extract_index_ivf(index).nprobe = args.nprobe
    proj = np.load(out / "proj.npy", mmap_mode="r")
    pca = faiss.downcast_VectorTransform(index.chain.at(0))
    open_s = time.perf_counter() - t0
    after_open = rss()
    queries = np.load(out / "queries.npy")
    truth = np.load(out / "truth.npy")
    times, cpu, top_codes, top_rerank = [], [], [], []
    for i, q in enumerate(np.concatenate([queries[:10], queries])):
        t, c0 = time.perf_counter(), time.thread_time()
        _, cand = index.search(q[None], args.shortlist)
        c = np.sort(cand[0][cand[0] >= 0])
        qp = pca.apply(q[None])[0]
        d = np.linalg.norm(np.asarray(proj[c], np.float32) - qp, axis=1)
        best = c[np.argsort(d)[:10]]
        dt, dc = time.perf_counter() - t, time.thread_time() - c0
        if i >= 10:  # the first ten are warm-up
            times.append(dt * 1e3)
            cpu.append(dc * 1e3)
            top_codes.append(cand[0][:10])
            top_rerank.append(best)
    codes, rer = np.array(top_codes), np.array(top_rerank)
    print(
        json.dumps(
            {
                "open_s": open_s,
                "rss_before_mib": before,
                "rss_after_open_mib": after_open,
                "rss_after_queries_mib": rss(),
                "latency_ms": {
                    "median": statistics.median(times),
                    "p90": float(np.percentile(times, 90)),
                    "min": min(times),
                    "cpu_median": statistics.median(cpu),
                },
                "recall_at_1": float(np.mean(rer[:, 0] == truth[:, 0])),
                "recall_at_10": float(np.mean((rer == truth[:, :1]).any(1))),
                "recall_at_1_codes": float(np.mean(codes[:, 0] == truth[:, 0])),
                "recall_at_10_codes": float(np.mean((codes == truth[:, :1]).any(1))),
            }
        )
    )


def build(args: argparse.Namespace) -> None:
    import faiss

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dim, rows = args.dim, args.chunk
    parts = structure(dim)
    chunks = -(-args.entries // rows)
    report: dict[str, object] = {"entries": args.entries, "dim": dim, "factory": f"PCA256,{args.ivf_pq}"}
    t0 = time.perf_counter()
    sample = np.concatenate([keys_of(c, rows, dim, parts) for c in range(-(-args.train // rows))])[
        : args.train
    ]
    report["gen_train_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    pca = faiss.PCAMatrix(dim, 256)
    pca.train(sample[: args.pca_train])  # fewer samples than dimensions: faiss takes the Gram matrix path
    pca.PCAMat.clear()  # d x d eigenvectors (1 GiB here); the 256 x d projection is all search needs
    report["pca_train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    inner = faiss.index_factory(256, args.ivf_pq)
    faiss.extract_index_ivf(inner).cp.min_points_per_centroid = 1
    inner.do_polysemous_training = False
    inner.train(pca.apply(sample))
    report["ivfpq_train_s"] = time.perf_counter() - t
    del sample
    index = faiss.IndexPreTransform(pca, inner)
    proj = np.lib.format.open_memmap(out / "proj.npy", mode="w+", dtype=np.float16, shape=(args.entries, 256))
    t = time.perf_counter()
    gen_s = 0.0
    for c in range(chunks):
        g = time.perf_counter()
        block = keys_of(c, rows, dim, parts)[: args.entries - c * rows]
        gen_s += time.perf_counter() - g
        p = pca.apply(block)
        inner.add(p)
        proj[c * rows : c * rows + len(block)] = p
        if c % 16 == 0:
            print(f"added {c * rows + len(block)} / {args.entries}", file=sys.stderr, flush=True)
    proj.flush()
    del proj
    report["add_s"] = time.perf_counter() - t
    report["add_generation_s"] = gen_s
    faiss.write_index(index, str(out / "index.faiss"))
    report["index_bytes"] = (out / "index.faiss").stat().st_size
    report["proj_bytes"] = (out / "proj.npy").stat().st_size
    report["code_bytes"] = int(faiss.extract_index_ivf(inner).code_size)  # stored per entry, plus an id
    # ground truth: exact search over every full 16,384-d key, generated again chunk by chunk
    queries = keys_of(0, args.queries, dim, parts, offset=1)
    t = time.perf_counter()
    best_d = np.full((len(queries), 0), np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    qq = (queries**2).sum(1, keepdims=True)
    for c in range(chunks):
        block = keys_of(c, rows, dim, parts)[: args.entries - c * rows]
        d2 = qq - 2 * queries @ block.T + (block**2).sum(1)[None]
        ids = np.broadcast_to(np.arange(c * rows, c * rows + len(block)), d2.shape)
        all_d, all_i = np.concatenate([best_d, d2], 1), np.concatenate([best_i, ids], 1)
        top = np.argsort(all_d, 1)[:, :10]
        best_d, best_i = np.take_along_axis(all_d, top, 1), np.take_along_axis(all_i, top, 1)
    report["exact_search_s"] = time.perf_counter() - t
    np.save(out / "queries.npy", queries)
    np.save(out / "truth.npy", best_i)
    (out / "build.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/kb-scale"))
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=16384)
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--pca-train", type=int, default=4096)
    parser.add_argument("--ivf-pq", default="IVF1024,PQ32")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--shortlist", type=int, default=128)
    parser.add_argument("--query-only", action="store_true", help="(internal) the query subprocess")
    args = parser.parse_args()
    if args.query_only:
        query_process(args)
        return
    flags = sorted(set(Path("/proc/cpuinfo").read_text().split()) & {"avx2", "avx512_vnni"})
    print(f"CPU flags: {' '.join(flags)}; cores {os.cpu_count()}")
    if not (args.out / "build.json").exists():
        build(args)
    cmd = [
        sys.executable,
        __file__,
        "--query-only",
        "--out",
        str(args.out),
        "--nprobe",
        str(args.nprobe),
        "--shortlist",
        str(args.shortlist),
    ]
    res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    built = json.loads((args.out / "build.json").read_text())
    print(
        json.dumps(
            {"build": built, "query": res, "nprobe": args.nprobe, "shortlist": args.shortlist}, indent=2
        )
    )
    n = built["entries"]
    train_s = built["pca_train_s"] + built["ivfpq_train_s"]
    anon = res["rss_after_queries_mib"]["RssAnon"] - res["rss_before_mib"]["RssAnon"]
    file_ = res["rss_after_queries_mib"]["RssFile"] - res["rss_before_mib"]["RssFile"]
    print(
        "| entries | dim | index | index file | B/entry (codes+id) | PCA proj. (re-rank) | build | "
        "RSS added anon / file | lookup median / p90 | recall@1 / @10 (codes alone) |\n" + "|---" * 10 + "|\n"
        f"| {n:,} | {built['dim']:,} | {built['factory']} | {built['index_bytes'] / 2**20:.0f} MiB | "
        f"{built['code_bytes'] + 8} | {built['proj_bytes'] / 2**20:.0f} MiB | "
        f"{train_s + built['add_s']:.0f} s (add {built['add_s']:.0f} s, "
        f"of which generating keys {built['add_generation_s']:.0f} s) | {anon:.0f} / {file_:.0f} MiB | "
        f"{res['latency_ms']['median']:.2f} / {res['latency_ms']['p90']:.2f} ms "
        f"(CPU {res['latency_ms']['cpu_median']:.2f} ms) | "
        f"{res['recall_at_1']:.3f} / {res['recall_at_10']:.3f} ({res['recall_at_1_codes']:.3f} / "
        f"{res['recall_at_10_codes']:.3f}) |"
    )


if __name__ == "__main__":
    main()
