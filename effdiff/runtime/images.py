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


def default_overlap(tile: int) -> int:
    """The overlap of tiles of `tile` latents unless told: a quarter of the tile."""
    return max(1, tile // 4)


def tile_starts(side: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of `tile` latents start along a side, `overlap` apart; the last one ends at the edge."""
    pos = list(range(0, max(side - tile, 0) + 1, max(1, tile - overlap)))
    return pos if pos[-1] + tile >= side else [*pos, side - tile]


def tile_for_count(side: int, count: int) -> int:
    """The smallest tile (with its default overlap) that covers `side` latents in `count` tiles: a tile a
    little over half the side covers it in two, where the half-side tile needs three (2.25x the work)."""
    return next(t for t in range(1, side + 1) if len(tile_starts(side, t, default_overlap(t))) <= count)


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
    overlap = overlap if overlap is not None else default_overlap(tile)
    out = np.zeros((b, 3, h * factor, w * factor), np.float32)
    weight = np.zeros((1, 1, h * factor, w * factor), np.float32)
    ramp_len = overlap * factor
    for y in tile_starts(h, tile, overlap):
        for x in tile_starts(w, tile, overlap):
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
