"""The reference model's procedural dataset: one coloured shape on a plain background, and its prompt.

"a small red triangle at the top left on a gray background". Deterministic from a seed; a fixed set of
(kind, colour) pairs is held out of training to measure generalisation to unseen prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}
BACKGROUNDS = {"gray": (128, 128, 128), "black": (15, 15, 15), "white": (245, 245, 245)}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
ATTRIBUTES = {
    "kind": KINDS,
    "colour": tuple(COLOURS),
    "size": SIZES,
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}
# Unseen in training: every kind and every colour still appears, just not in these pairs.
HELD_OUT = frozenset({("star", "yellow"), ("circle", "purple"), ("triangle", "green"), ("square", "orange")})
IMAGE_SIZE = 64


@dataclass(frozen=True)
class Scene:
    kind: str
    colour: str
    size: str
    position: str
    background: str

    @property
    def prompt(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.colour} {self.kind} {where} on a {self.background} background"

    @property
    def held_out(self) -> bool:
        return (self.kind, self.colour) in HELD_OUT

    def labels(self) -> dict[str, int]:
        return {name: values.index(getattr(self, name)) for name, values in ATTRIBUTES.items()}


def all_scenes(held_out: bool | None = None) -> list[Scene]:
    """Every attribute combination; `held_out` True/False keeps only held-out / training scenes."""
    scenes = [Scene(*combo) for combo in product(*ATTRIBUTES.values())]
    return [s for s in scenes if held_out is None or s.held_out == held_out]


def render(scene: Scene, rng: np.random.Generator | None = None, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw the scene (anti-aliased by drawing at 4x); `rng` jitters position and size slightly."""
    scale = 4
    s = size * scale
    img = Image.new("RGB", (s, s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    radius = (0.14 if scene.size == "small" else 0.27) * s
    centres = {
        "top left": (0.27, 0.27),
        "top right": (0.73, 0.27),
        "bottom left": (0.27, 0.73),
        "bottom right": (0.73, 0.73),
        "center": (0.5, 0.5),
    }
    cx, cy = centres[scene.position]
    if rng is not None:
        cx += rng.uniform(-0.04, 0.04)
        cy += rng.uniform(-0.04, 0.04)
        radius *= rng.uniform(0.9, 1.1)
    cx, cy = cx * s, cy * s
    colour = COLOURS[scene.colour]
    if scene.kind == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    elif scene.kind == "square":
        r = radius * 0.88
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif scene.kind == "triangle":
        pts = [(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in np.radians([-90, 30, 150])]
        draw.polygon(pts, fill=colour)
    else:  # five-pointed star
        angles = np.radians(np.arange(10) * 36 - 90)
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
        draw.polygon(
            [(cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles, strict=True)],
            fill=colour,
        )
    return img.resize((size, size), Image.Resampling.LANCZOS)


def sample_batch(n: int, rng: np.random.Generator, held_out: bool = False) -> tuple[np.ndarray, list[Scene]]:
    """n random scenes (training split unless `held_out`) as (n, 3, H, W) float32 in [-1, 1]."""
    pool = all_scenes(held_out=held_out)
    scenes = [pool[i] for i in rng.integers(0, len(pool), size=n)]
    arr = np.stack([np.asarray(render(sc, rng), dtype=np.float32) for sc in scenes])
    return (arr.transpose(0, 3, 1, 2) / 127.5 - 1.0).astype(np.float32), scenes
