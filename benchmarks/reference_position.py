"""Does the reference model follow "top left"? If not, is it the judge, the prompt, or the model?

Four readings, on the same starting noise for the five position words (everything else in the prompt
fixed per seed):
1. the attribute classifier's position accuracy on real renders (is the judge right?);
2. where the model puts the shape after the full sampling run: position adherence, and the share of
   seeds whose five prompts all land in the same place (the noise, not the prompt, decides);
3. how far apart the text encoder puts prompts that differ only in the position words, against
   prompts that differ only in the colour word (relative spread of the hidden states around their mean);
4. the same for the UNet's own x0 prediction at the noisiest steps (t = 999 ... 700, one call on pure
   noise, no guidance), where the layout is decided: how far the position words move it against the
   colour words (RMS change, latent units), and where the move lands (centre of the change per
   prompted position, in latent cells as (x, y) in [0, 1]). The centre is that of the absolute change
   over the whole map, so the change elsewhere pulls it towards (0.5, 0.5): a model that ignores
   position reads about (0.5, 0.5) for every word, and one that follows it (v2 after the layout
   steps, adherence 1.000) read (0.39, 0.40) for "top left", not where the shape is drawn. The probe
   takes the first seed's scene as the prompt for every seed's noise. One DDIM step is not this
   reading: with the scheduler's "leading" spacing, a 1-step run evaluates the UNet at t=1, not at
   t=999.

  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/reference_position.py [--seeds 24]   # about 2 minutes
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from effdiff.export.onnx import export_onnx
from effdiff.reference.dataset import COLOURS, POSITIONS, Scene, all_scenes, render
from effdiff.reference.judge import AttributeClassifier
from effdiff.reference.scenes import REFERENCE_GUIDANCE
from effdiff.runtime.pipeline import Pipeline
from effdiff.runtime.schedulers import make_scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference", help="reference, or a diffusers folder to judge")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/reference"))
    parser.add_argument("--seeds", type=int, default=24, help="starting noises (x 5 position words)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=REFERENCE_GUIDANCE)
    parser.add_argument(
        "--probe-only",
        action="store_true",
        help="skip reading 2, the sampling (readings 1, 3 and 4 take seconds)",
    )
    args = parser.parse_args()
    if not (args.artifacts / "manifest.json").exists():
        export_onnx(args.model, args.artifacts, progress=False)
    pipe = Pipeline.load(args.artifacts)
    clf = AttributeClassifier()
    rng = np.random.default_rng(0)

    pool = all_scenes(held_out=False)
    real_scenes = [pool[i] for i in rng.integers(0, len(pool), 500)]
    preds = clf.run([render(s, rng) for s in real_scenes])[0]["position"]
    truth = np.array([POSITIONS.index(s.position) for s in real_scenes])
    print(f"1. classifier on 500 jittered real renders: position accuracy {np.mean(preds == truth):.3f}")

    bases = [pool[i] for i in rng.integers(0, len(pool), args.seeds)]
    side = pipe.geometry.latent_size(*pipe.default_size())
    noise = rng.standard_normal((args.seeds, 4, *side)).astype(np.float32)
    if not args.probe_only:
        confusion = np.zeros((len(POSITIONS), len(POSITIONS)), int)
        same_place = 0
        for base, z in zip(bases, noise, strict=True):
            scenes = [replace(base, position=p) for p in POSITIONS]
            prompts = [s.prompt for s in scenes]
            latents = np.repeat(z[None], len(scenes), 0)
            kwargs = {"guidance_scale": args.guidance, "latents": latents, "propagation": "none"}
            images = pipe(prompts, steps=args.steps, **kwargs).images
            read = clf.run(images)[0]["position"]
            for i, r in enumerate(read):
                confusion[i, r] += 1
            same_place += len(set(read.tolist())) == 1
        n = args.seeds * len(POSITIONS)
        print(
            f"2. after {args.steps} steps (guidance {args.guidance:g}, same noise for the 5 words): position "
            f"adherence {np.trace(confusion) / n:.3f} over {n} images; the 5 prompts of a seed all read as "
            f"one position for {same_place} of {args.seeds} seeds"
        )
        print("   prompted \\ read: " + ", ".join(POSITIONS))
        for p, row in zip(POSITIONS, confusion, strict=True):
            print(f"   {p:<12} {row.tolist()}")

    def spread(prompts: list[str]) -> float:
        states = pipe.encode_prompt(prompts, guidance_scale=1.0).embeddings  # no guidance: rows = prompts
        mean = states.mean(0, keepdims=True)
        return float(np.linalg.norm(states - mean) / np.linalg.norm(mean))

    by_position = np.mean([spread([replace(b, position=p).prompt for p in POSITIONS]) for b in bases])
    by_colour = np.mean([spread([replace(b, colour=c).prompt for c in COLOURS]) for b in bases])
    print(
        f"3. text encoder hidden states, relative spread over the 5 position words {by_position:.3f}, "
        f"over the {len(COLOURS)} colour words {by_colour:.3f}"
    )
    print("4. the UNet's x0 prediction on pure noise (one call per prompt, no guidance, seeds averaged):")
    layout_probe(pipe, bases[0], noise)


def layout_probe(pipe: Pipeline, base: Scene, noise: np.ndarray) -> None:
    """How far the UNet's x0 estimate moves with the position words and with the colour words at the
    noisiest steps (RMS, latent units), and the centre of each position word's change from the mean
    over the five. One scene (`base`) gives the prompts; each seed's noise is a row of `noise`."""
    scheduler = make_scheduler("ddim", pipe.scheduler_config)
    alphas, v_prediction = scheduler.alphas_cumprod, scheduler.prediction_type == "v_prediction"
    unet = pipe.open_graph("unet")
    cells = noise.shape[-1]
    ys, xs = np.mgrid[0:cells, 0:cells] / (cells - 1)

    def x0(prompts: list[str], t: int) -> np.ndarray:  # (prompts, seeds, 4, h, w)
        states = pipe.encode_prompt(prompts, guidance_scale=1.0).embeddings
        a = alphas[t]
        out = []
        for row in states:
            feeds = {
                "sample": noise,
                "timestep": np.full(len(noise), float(t), np.float32),
                "encoder_hidden_states": np.repeat(row[None], len(noise), 0),
            }
            pred = unet.run(feeds)["noise_pred"]
            if v_prediction:
                out.append(np.sqrt(a) * noise - np.sqrt(1 - a) * pred)
            else:
                out.append((noise - np.sqrt(1 - a) * pred) / np.sqrt(a))
        return np.stack(out)

    def spread(x: np.ndarray) -> float:  # RMS change from the mean over the prompts, in latent units
        return float(np.sqrt(np.mean((x - x.mean(0, keepdims=True)) ** 2)))

    for t in (999, 900, 800, 700):
        by_position = x0([replace(base, position=p).prompt for p in POSITIONS], t)
        by_colour = x0([replace(base, colour=c).prompt for c in COLOURS], t)
        change = np.abs(by_position - by_position.mean(0, keepdims=True)).sum((1, 2))  # (positions, h, w)
        centres = [(float((c * xs).sum() / c.sum()), float((c * ys).sum() / c.sum())) for c in change]
        where = ", ".join(f"{p} ({x:.2f}, {y:.2f})" for p, (x, y) in zip(POSITIONS, centres, strict=True))
        print(
            f"   t={t}: spread over position words {spread(by_position):.3f}, over colour words "
            f"{spread(by_colour):.3f}; change centred at {where}"
        )


if __name__ == "__main__":
    main()
