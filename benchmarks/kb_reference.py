"""Retrieval start on the reference model: a knowledge base of >= 2,000 trajectories built from prompts
disjoint from the evaluation prompts, its index figures, and UNet evaluations saved against shape and
colour adherence on the held-in (192) and held-out (120) evaluation prompts.

  HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/kb_reference.py --kb runs/kb-reference

Re-runnable after the reference model changes: the KB is tied to the artifacts' hashes, so a new
model needs a new KB (`--kb` a new folder; the build resumes if interrupted: about 1.5 hours on 2 busy
cores for 408 prompts x 5 seeds at DDIM 50, running 40 of the 50 steps).

Steps: (1) export the reference model; (2) build the KB (disjoint_scenes() x seeds 0..4, DDIM 50,
guidance 3, key step 10, values at 15..40); (3) index recall against exact search, lookup latency, RSS of
a process that opens the KB; (4) choose the jump quantiles on the KB's own entries, never on the
evaluation prompts: each of `--validate` entries is looked up with every entry of its prompt left out,
jumps to every value step, and is finished and judged; a policy is then simulated from those images
and the most saving one whose shape and colour stay within `--margin` of the entries' own full
generations is kept; (5) the evaluation: full generation, KB configurations and encoder propagation on
the evaluation prompts, each image starting from one of the KB's seeds in turn (ReDi's protocol of
shared starting noise), plus held-in prompts from unseen noise, which should get no jump.

A KB built from another schedule's trajectories (`effdiff kb build --propagation cache:3`, or
`--kb-propagation cache:3` here when the folder is new) is validated on that schedule and is meant for
its configuration: `--configs "kb+cache:3 adaptive"`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from effdiff.export.onnx import export_onnx
from effdiff.kb.adaptive import DEFAULT_MAX_VALUE_ERROR, default_quantiles
from effdiff.kb.build import IndexOptions, _same_prompt_groups, build_kb
from effdiff.kb.evaluate import (
    KBConfig,
    default_seeds,
    eval_index,
    eval_quality,
    full_runs,
    kb_info,
    markdown_table,
)
from effdiff.kb.store import BuildSettings, KnowledgeBase
from effdiff.reference.dataset import all_scenes
from effdiff.reference.judge import AttributeClassifier
from effdiff.reference.scenes import REFERENCE_GUIDANCE, disjoint_scenes, held_in_scenes, held_out_scenes
from effdiff.runtime.pipeline import Pipeline

SETTINGS = BuildSettings(
    sampler="ddim",
    steps=50,
    guidance=REFERENCE_GUIDANCE,
    key_step=10,
    value_steps=(15, 20, 25, 30, 35, 40),
    seeds=(0, 1, 2, 3, 4),
)
SPANS = [(0.99, 0.9), (0.98, 0.8), (0.95, 0.6), (0.95, 0.4), (0.9, 0.2), (1.0, 1.0)]


def cpu_flags() -> str:
    flags = sorted(set(Path("/proc/cpuinfo").read_text().split()) & {"avx2", "avx512_vnni"})
    return f"CPU flags: {' '.join(flags)}; {os.cpu_count()} cores; load {os.getloadavg()[0]:.1f}"


def memory_probe(kb: Path) -> dict[str, float]:
    """RSS (anonymous and file-backed) a fresh process adds by opening the KB and answering lookups."""
    code = f"""
import json, numpy as np
from pathlib import Path
def rss():
    lines = Path('/proc/self/status').read_text().splitlines()
    keep = ('RssAnon', 'RssFile')
    return {{l.split(':')[0]: int(l.split()[1]) / 1024 for l in lines if l.startswith(keep)}}
from effdiff.kb.store import KnowledgeBase
import faiss
a = rss()
kb = KnowledgeBase.open({str(kb)!r}, checksum=False)
b = rss()
q = np.asarray(kb.keys[:200], np.float32) + 0.01
for row in q:
    kb.search(row[None], 4)
c = rss()
print(json.dumps({{k: [a[k], b[k], c[k]] for k in a}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def validate(pipe: Pipeline, kb: KnowledgeBase, count: int, margin: float, chunk: int = 32) -> tuple:
    """Per held-back KB entry: the image after a jump to every value step (its own prompt left out of
    the lookup, ReDi's blend of 4), and its own full generation. Returns the chosen quantile span."""
    clf = AttributeClassifier()
    s = kb.settings
    by_prompt = {sc.prompt: sc for sc in all_scenes()}
    prompts = kb.prompts()
    entries = np.asarray(kb.entries)
    held = np.sort(np.random.default_rng(2).choice(len(kb), min(count, len(kb)), replace=False))
    same = _same_prompt_groups(entries)
    found = kb.search(np.asarray(kb.keys[held], np.float32), 4, exclude=[same(int(e)) for e in held])
    scenes = [by_prompt[prompts[entries[e, 0]]] for e in held]
    steps = [*s.value_steps, None]  # None: the entry's own trajectory (its value at the last step)
    ok: dict[object, dict[str, np.ndarray]] = {}
    for v in steps:
        images = []
        for start in range(0, len(held), chunk):
            rows = held[start : start + chunk]
            cond = pipe.encode_prompt(
                [prompts[entries[e, 0]] for e in rows], s.negative_prompt, 1, s.guidance
            )
            step = s.value_steps[-1] if v is None else v
            if v is None:
                x = np.asarray(kb.values[rows, len(s.value_steps) - 1], np.float32)
            else:
                x = np.stack(
                    [kb.blend(kb.keys[e], found.ids[start + i], v, "lstsq") for i, e in enumerate(rows)]
                )
            x = x.reshape(len(rows), *kb.manifest.latent_shape)
            plan = pipe.plan(s.steps, s.sampler, s.propagation, noise_injection=None)  # the KB's own
            images += [*pipe.decode(pipe.denoise(x, cond, plan, start_step=step))]
        from effdiff.runtime.images import to_pil

        preds = clf.run(to_pil(np.stack(images)))[0]
        ok[v] = {
            a: np.array([p == sc.labels()[a] for p, sc in zip(preds[a], scenes, strict=True)])
            for a in ("kind", "colour")
        }
        print(
            f"  validation: jump to {v or 'none (own trajectory)'}: shape {ok[v]['kind'].mean():.3f}, "
            f"colour {ok[v]['colour'].mean():.3f}",
            flush=True,
        )
    dist = found.distances[:, 0]
    base = {a: ok[None][a].mean() for a in ("kind", "colour")}
    print(
        "| quantiles (shortest .. longest jump) | value-error cap | UNet steps saved | shape | colour |\n"
        "|---|---|---|---|---|\n"
        f"| own full generation | — | 0 % | {base['kind']:.3f} | {base['colour']:.3f} |"
    )
    tried = []
    for span in SPANS:
        q = default_quantiles(len(s.value_steps), span)
        # the runtime's policy (capped by the recorded value error), then the same without the cap
        for capped, policy in (
            (True, kb.policy("latent", q)),
            (False, kb.policy("latent", q, max_error=None)),
        ):
            chosen = [policy.choose(float(d)) for d in dist]
            saved = np.mean([0 if v is None else (v - s.key_step) / s.steps for v in chosen])
            acc = {a: np.mean([ok[v][a][i] for i, v in enumerate(chosen)]) for a in ("kind", "colour")}
            good = all(acc[a] >= base[a] - margin for a in acc)
            cap = f"<= {DEFAULT_MAX_VALUE_ERROR:g}" if capped else "off"
            print(
                f"| {span[0]:g} .. {span[1]:g} | {cap} | {100 * saved:.1f} % | {acc['kind']:.3f} | "
                f"{acc['colour']:.3f} |" + (" within margin" if good else "")
            )
            if capped:
                tried.append((good, saved, span))
    kept = [t for t in tried if t[0]]
    if kept:
        return max(kept, key=lambda t: t[1])[2]
    print("  no span kept shape and colour within the margin: using the least saving one", flush=True)
    return min(tried, key=lambda t: t[1])[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/reference"))
    parser.add_argument("--kb", type=Path, default=Path("runs/kb-reference"))
    parser.add_argument("--index", default="PCA128,PQ16")
    parser.add_argument(
        "--kb-propagation", default="none", help="schedule of the trajectories when --kb is built here"
    )
    parser.add_argument("--count", type=int, default=192, help="held-in scenes scored")
    parser.add_argument("--validate", type=int, default=128, help="KB entries used to choose the quantiles")
    parser.add_argument("--margin", type=float, default=0.02, help="adherence drop allowed in validation")
    parser.add_argument("--quantiles", help="skip validation: a span 'hi,lo' for the adaptive policy")
    parser.add_argument("--fixed", type=int, default=30, help="ReDi's rule for comparison: always jump here")
    parser.add_argument("--unseen", type=int, default=64, help="held-in prompts from unseen noise")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--cache", type=Path, default=Path("runs/kb-eval-cache"), help="full runs kept here")
    parser.add_argument("--configs", default="", help="only these KB configurations (comma-separated names)")
    parser.add_argument("--splits", default="held-in,held-out")
    parser.add_argument(
        "--baselines-only", action="store_true", help="only the full runs (no KB needed): start them early"
    )
    args = parser.parse_args()
    print(cpu_flags(), flush=True)
    if not (args.artifacts / "manifest.json").exists():
        # Only a missing folder is exported: a KB is tied to its artifacts' file hashes, and re-exporting
        # with a newer effdiff would orphan a half-built KB.
        export_onnx("reference", args.artifacts, progress=False)
    held_in = held_in_scenes(args.count)
    unseen = held_in[: args.unseen]
    unseen_seeds = [10_000 + i for i in range(len(unseen))]
    if args.baselines_only:
        pipe = Pipeline.load(args.artifacts)
        for scenes, seeds, props in (
            (held_in, None, ("none", "fd-ddim50")),
            (held_out_scenes(), None, ("none", "fd-ddim50")),
            (unseen, unseen_seeds, ("none",)),
        ):
            for prop in props:
                t = time.perf_counter()
                seeds = seeds or default_seeds(SETTINGS, len(scenes))
                full_runs(pipe, SETTINGS, [s.prompt for s in scenes], seeds, prop, cache=args.cache)
                print(f"full runs: {len(scenes)} images, {prop}: {time.perf_counter() - t:.0f}s", flush=True)
        return
    t0 = time.perf_counter()
    if not (args.kb / "kb.json").exists():
        build_kb(
            args.artifacts,
            [s.prompt for s in disjoint_scenes()],
            args.kb,
            dataclasses.replace(SETTINGS, propagation=args.kb_propagation),
            IndexOptions(args.index),
            checkpoint_every=64,
            batch=32,
            resume=True,
        )
    print(f"KB ready in {time.perf_counter() - t0:.0f}s", flush=True)
    print("\n".join(kb_info(args.kb, checksum=True).lines()))
    kb = KnowledgeBase.open(args.kb)
    for space in ("latent", "prompt"):
        print("\n".join(eval_index(kb, 200, space).lines()), flush=True)
    mem = memory_probe(args.kb)
    print(f"RSS of a process opening the KB, [before, after open, after 200 lookups] MiB: {mem}", flush=True)
    if args.skip_eval:
        return
    pipe = Pipeline.load(args.artifacts)
    if args.quantiles:
        span = tuple(float(q) for q in args.quantiles.split(","))
    else:
        span = validate(pipe, kb, args.validate, args.margin)
    q = ",".join(f"{x:.4g}" for x in default_quantiles(len(kb.value_steps), span))
    print(f"adaptive policy: quantiles {q} (span {span})", flush=True)
    configs = [
        KBConfig("kb adaptive", jump=f"adaptive:{q}"),  # with the default prompt gate
        KBConfig("kb adaptive, no prompt gate", jump=f"adaptive:{q}", prompt_gate=None),
        KBConfig(f"kb fixed {args.fixed} (ReDi)", jump=str(args.fixed)),
        KBConfig("fd+kb adaptive", jump=f"adaptive:{q}", propagation="fd-ddim50"),
        KBConfig("kb+cache:3 adaptive", jump=f"adaptive:{q}", propagation="cache:3"),
    ]
    if args.configs:
        configs = [c for c in configs if c.name in args.configs.split(",")]
    rows = []
    splits = (("held-in", held_in), ("held-out", held_out_scenes()))
    for split, scenes in (x for x in splits if x[0] in args.splits.split(",")):
        print(f"{split}: {len(scenes)} images", flush=True)
        rows += eval_quality(pipe, kb, scenes, split, configs, cache=args.cache)
    adaptive = [c for c in configs if c.name == "kb adaptive"]
    if args.unseen and adaptive:
        rows += eval_quality(
            pipe, kb, unseen, "held-in, unseen noise", adaptive, seeds=unseen_seeds, cache=args.cache
        )
    print(cpu_flags())
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
