"""How good the reference model is at its task: prompt adherence (attribute classifier), held-in and
held-out, the domain Frechet distance to real renders, and a sample grid (prompts x seeds).

  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/reference_quality.py            # about 3 minutes, 2 cores
  ... --guidance 2,3,4,5,6    # a sweep: rows per guidance scale; the grid uses the first
  ... --seed 5000             # another draw of the starting noise
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from effdiff.export.onnx import export_onnx
from effdiff.reference.dataset import render
from effdiff.reference.judge import Adherence, AttributeClassifier, frechet_distance, misread
from effdiff.reference.scenes import DEMO_SCENES, REFERENCE_GUIDANCE, held_in_scenes, held_out_scenes
from effdiff.runtime.images import image_grid
from effdiff.runtime.pipeline import Pipeline


def generate(
    pipe: Pipeline, scenes: list, seed: int, steps: int, guidance: float, propagation: str, chunk: int = 32
) -> list[Image.Image]:
    images = []
    for i in range(0, len(scenes), chunk):
        part = scenes[i : i + chunk]
        res = pipe(
            [s.prompt for s in part],
            steps=steps,
            guidance_scale=guidance,
            seed=seed + i,
            propagation=propagation,
        )
        images += res.images
    return images


def guidance_list(text: str) -> list[float]:
    try:
        return [float(g) for g in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference", help="reference, or a diffusers folder to judge")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/reference"))
    parser.add_argument("--count", type=int, default=192, help="held-in scenes scored")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--guidance",
        type=guidance_list,
        default=[REFERENCE_GUIDANCE],
        help="guidance scale, or a comma-separated sweep",
    )
    parser.add_argument("--seed", type=int, default=1000, help="seed of the first chunk of images")
    parser.add_argument("--propagation", default="none")
    parser.add_argument(
        "--grid",
        type=Path,
        help="sample grid PNG (default: docs/reference_grid.png for the shipped model, else in --artifacts)",
    )
    parser.add_argument("--splits", default="held-in,held-out", help="which of held-in, held-out to score")
    args = parser.parse_args()
    splits = {"held-in": held_in_scenes(args.count), "held-out": held_out_scenes()}
    unknown = set(args.splits.split(",")) - set(splits)
    if unknown:
        parser.error(f"unknown split(s) {', '.join(sorted(unknown))}; known: held-in, held-out")
    if args.grid is None:
        shipped = args.model == "reference"
        args.grid = Path("docs/reference_grid.png") if shipped else args.artifacts / "reference_grid.png"
    export_onnx(args.model, args.artifacts, progress=False)
    pipe = Pipeline.load(args.artifacts)
    clf = AttributeClassifier()
    print(f"DDIM {args.steps} steps, propagation {args.propagation}, seed {args.seed}")
    print("| guidance | split | images | kind | colour | size | position | background | mean | domain FD |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    misses = {}  # "guidance G, split" -> which colour was drawn as which
    for guidance in args.guidance:
        for name in args.splits.split(","):
            scenes = splits[name]
            images = generate(pipe, scenes, args.seed, args.steps, guidance, args.propagation)
            preds, feats = clf.run(images)
            adh = Adherence.of(preds, scenes)
            real = [render(s, np.random.default_rng(i)) for i, s in enumerate(scenes)]
            fd = frechet_distance(feats.astype(np.float64), clf.run(real)[1].astype(np.float64))
            per = adh.per_attribute
            misses[f"guidance {guidance:g}, {name}"] = misread(preds, scenes, "colour", by="background")
            print(
                f"| {guidance:g} | {name} | {adh.count} | {per['kind']:.3f} | {per['colour']:.3f} | "
                f"{per['size']:.3f} | {per['position']:.3f} | {per['background']:.3f} | {adh.mean:.3f} | "
                f"{fd:.2f} |",
                flush=True,
            )
    for where, triples in misses.items():
        # the backgrounds they happened on: a colour pair the VAE merges on one background shows here
        pairs: Counter[tuple[str, str]] = Counter()
        on: dict[tuple[str, str], Counter[str]] = {}
        for (a, b, bg), n in triples.most_common():
            pairs[(a, b)] += n
            on.setdefault((a, b), Counter())[bg] += n
        listed = ", ".join(
            f"{a} drawn as {b}: {n} (on {', '.join(f'{bg} {k}' for bg, k in on[(a, b)].most_common())})"
            for (a, b), n in pairs.most_common()
        )
        print(f"colour misses ({where}): {listed or 'none'}")
    # sample grid: rows = prompts (4 held-in, 2 held-out), columns = seeds
    rows = []
    for scene in DEMO_SCENES:
        res = pipe(scene.prompt, steps=args.steps, guidance_scale=args.guidance[0], num_images=4, seed=7)
        rows += res.images
    grid = image_grid(rows, cols=4)
    grid = grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST)
    args.grid.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.grid)
    print(f"sample grid {args.grid}: rows = " + "; ".join(s.prompt for s in DEMO_SCENES))


if __name__ == "__main__":
    main()
