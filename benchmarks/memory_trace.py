"""Where one graph's run peaks, node by node: the process's RSS sampled every millisecond, laid against
ONNX Runtime's own profile of the run (which node ran when), so a peak is pinned to the op it falls in.

  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/memory_trace.py --artifacts artifacts/sd15-arch-fused \
      --graph vae_decoder --size 512 --rows 1 [--variant fp32] [--options no-arena-no-pattern]
  (prints the nodes with the highest RSS while they ran, each with its output size; writes
   memory_trace_<artifacts>_<graph>_<variant>_<size>.md, .json and .png: RSS over the run, the peak
   node marked)

Option sets are benchmarks/memory.py's. The default, no arena and no memory pattern (and so, in the
runtime, no buffer reuse), gives every tensor an allocation of its own, returned when it dies, so RSS
follows what is live (`no-arena-no-pattern-reuse` shows buffers held for reuse as well); with the
pattern on, the run's planned block stays touched once touched, and RSS shows the plan's peak but
not where it falls. The session's first run (its allocations, any lazy set-up) is untraced; the
second is traced. A sample can miss a peak shorter than a millisecond, and glibc may hold freed
small allocations, so this is a picture of what is live, not ONNX Runtime's allocation plan.
"""

from __future__ import annotations

import argparse
import bisect
import json
import tempfile
import time
from pathlib import Path

from memory import sample_feeds, session_options  # benchmarks/ is this script's folder, on sys.path

from effdiff.artifacts import Manifest
from effdiff.bench.device import describe, device_profile
from effdiff.profiling import PeakRSS
from effdiff.runtime.backends.ort import OrtGraph

GIB = 2**30


def trace(artifacts: Path, graph: str, variant: str, option_set: str, size: int, rows: int) -> dict:
    """Run the graph twice; the second run's RSS samples, each tagged with the node running then."""
    manifest = Manifest.read(artifacts)
    var = manifest.variant(graph, variant)
    spec = manifest.spec(graph, var)
    feeds = sample_feeds(manifest, spec, size, rows)
    with tempfile.TemporaryDirectory() as tmp:  # ONNX Runtime writes its profile there
        options = {**session_options(option_set), "enable_profiling": True}
        options["profile_file_prefix"] = str(Path(tmp) / graph)
        session = OrtGraph(artifacts / var.file, spec, options=options)
        session.run(feeds)
        with PeakRSS(0.001, timeline=True) as rss:
            start = time.perf_counter()
            session.run(feeds)
            seconds = time.perf_counter() - start
        events = json.loads(Path(session.session.end_profiling()).read_text())
    run = [e for e in events if e.get("name") == "model_run"][-1]
    nodes = sorted(
        (
            e
            for e in events
            if e.get("cat") == "Node" and e["ts"] >= run["ts"] and e["name"].endswith("_kernel_time")
        ),
        key=lambda e: e["ts"],
    )
    begins = [e["ts"] for e in nodes]
    samples = []
    for t, value in rss.samples or []:
        us = run["ts"] + (t - start) * 1e6  # the profile's clock, from the run's start
        i = bisect.bisect_right(begins, us) - 1
        node = nodes[i] if i >= 0 and us <= nodes[i]["ts"] + nodes[i]["dur"] else None
        samples.append((t - start, (value - rss.baseline) / GIB, node))
    per_node: dict[str, dict] = {}
    for _, gib, node in samples:
        if node is None:
            continue
        name = node["name"].removesuffix("_kernel_time")
        row = per_node.setdefault(
            name,
            {
                "node": name,
                "op": node["args"].get("op_name", ""),
                "output_mib": int(node["args"].get("output_size", 0)) / 2**20,
                "gib": gib,
            },
        )
        row["gib"] = max(row["gib"], gib)
    return {
        "graph": graph,
        "variant": variant,
        "options": option_set,
        "size": size,
        "rows": rows,
        "run_s": seconds,
        "peak_added_gib": (rss.peak_bytes - rss.baseline_bytes) / GIB,
        "nodes": sorted(per_node.values(), key=lambda r: -r["gib"]),
        "timeline": [
            (round(t, 4), round(g, 4), n["name"].removesuffix("_kernel_time") if n else "")
            for t, g, n in samples
        ],
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [t for t, _, _ in result["timeline"]]
    gib = [g for _, g, _ in result["timeline"]]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.plot(ts, gib, lw=1)
    top = max(result["timeline"], key=lambda s: s[1])
    ax.annotate(
        top[2] or "(between nodes)", (top[0], top[1]), xytext=(5, -15), textcoords="offset points", fontsize=8
    )
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("RSS above the session, GiB")
    r = result
    ax.set_title(f"{r['graph']} {r['variant']}, {r['size']}px, {r['rows']} rows, {r['options']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--graph", default="vae_decoder")
    parser.add_argument("--variant", default="fp32")
    parser.add_argument(
        "--options", default="no-arena-no-pattern", help="an option set of benchmarks/memory.py"
    )
    parser.add_argument("--size", type=int, default=512, help="image size in pixels")
    parser.add_argument("--rows", type=int, default=1, help="batch rows (the VAE decodes one per image)")
    parser.add_argument("--top", type=int, default=12, help="nodes listed")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    result = trace(args.artifacts, args.graph, args.variant, args.options, args.size, args.rows)
    lines = [
        f"machine: {describe(device_profile())}",
        f"{args.graph} {args.variant}, {args.size}px, {args.rows} rows, options {args.options}: run "
        f"{result['run_s']:.2f} s, peak {result['peak_added_gib']:.3f} GiB above the session",
        "",
        "| node | op | output MiB | RSS above the session while it ran, GiB |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['node']} | {r['op']} | {r['output_mib']:.0f} | {r['gib']:.3f} |"
        for r in result["nodes"][: args.top]
    ]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"memory_trace_{args.artifacts.name}_{args.graph}_{args.variant}_{args.size}"
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(result) + "\n")
    plot(result, stem.with_suffix(".png"))
    print(f"wrote {stem}.md, .json and .png")


if __name__ == "__main__":
    main()
