"""Images in and out of the runtime: numpy batches to PIL, grids, atomic PNG writes, tiled VAE decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from effdiff.artifacts import atomic_path
from effdiff.errors import EffdiffError
from effdiff.runtime.backends import Graph


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images, rounded as diffusers rounds."""
    arr = np.clip(images.astype(np.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


def image_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Images side by side in rows of `cols`."""
    cols = cols or len(images)
    rows = -(-len(images) // cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def save_image(images: list[Image.Image], path: Path) -> None:
    """One image, or a grid of several, written atomically as PNG."""
    img = images[0] if len(images) == 1 else image_grid(images)
    try:
        with atomic_path(Path(path)) as tmp:
            img.save(tmp, format="PNG")
    except OSError as exc:
        raise EffdiffError(f"cannot write {path}: {exc.strerror or exc}") from None


def tiled_decode(
    vae: Graph, latents: np.ndarray, tile: int, factor: int, overlap: int | None = None
) -> np.ndarray:
    """Decode overlapping latent tiles and feather them together, so peak memory follows the tile size.

    GroupNorm and attention in the VAE see one tile at a time, so results differ slightly from a
    whole decode (as in diffusers' tiled VAE); overlaps hide the seams.
    """
    b, _, h, w = latents.shape
    if tile >= h and tile >= w:
        return vae.run({"latent": latents})["image"]
    overlap = overlap if overlap is not None else max(1, tile // 4)
    stride = max(1, tile - overlap)

    def starts(n: int) -> list[int]:
        pos = list(range(0, max(n - tile, 0) + 1, stride))
        return pos if pos[-1] + tile >= n else [*pos, n - tile]

    out = np.zeros((b, 3, h * factor, w * factor), np.float32)
    weight = np.zeros((1, 1, h * factor, w * factor), np.float32)
    ramp_len = overlap * factor
    for y in starts(h):
        for x in starts(w):
            th, tw = min(tile, h), min(tile, w)
            part = vae.run({"latent": np.ascontiguousarray(latents[:, :, y : y + th, x : x + tw])})["image"]
            ys = np.minimum(np.arange(th * factor) + 1, np.arange(th * factor)[::-1] + 1)
            xs = np.minimum(np.arange(tw * factor) + 1, np.arange(tw * factor)[::-1] + 1)
            wy = np.clip(ys / ramp_len, 1e-3, 1.0)
            wx = np.clip(xs / ramp_len, 1e-3, 1.0)
            wgt = (wy[:, None] * wx[None, :])[None, None].astype(np.float32)
            sl = (
                slice(None),
                slice(None),
                slice(y * factor, (y + th) * factor),
                slice(x * factor, (x + tw) * factor),
            )
            out[sl] += part.astype(np.float32) * wgt
            weight[sl] += wgt
    return out / weight
