"""Text-to-image from exported artifacts with numpy + onnxruntime + tokenizers only.

Classifier-free guidance runs as one batch of 2B rows: [negative x B, prompt x B], as diffusers does.
With encoder propagation the encoder runs at key steps only and the decoder calls that share one key
step's features run as one batch; with `none` the whole-UNet graph runs at every step.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from effdiff.artifacts import check_complete, graph_path, manifest_specs, read_json, read_manifest
from effdiff.bench.memory import PeakRSS
from effdiff.errors import EffdiffError
from effdiff.runtime.backend import OrtGraph, default_providers
from effdiff.runtime.propagation import DEFAULT_INJECTION, KeySchedule, NoiseInjection
from effdiff.runtime.schedulers import make_scheduler
from effdiff.runtime.tokenizer import PromptTokenizer
from effdiff.specs import Geometry

COMPONENTS = ("text_encoder", "unet_encoder", "unet_decoder", "unet", "vae_decoder")


@dataclass
class GenerationResult:
    images: list[Image.Image]
    latents: np.ndarray  # final latents, model space (B, C, h, w)
    timings: dict[str, float]  # seconds per component, "overhead", "total", "load"
    calls: dict[str, int]
    peak_rss_gib: float
    key_steps: tuple[int, ...]


@dataclass
class _Stats:
    run: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COMPONENTS, 0.0))
    calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMPONENTS, 0))
    load: float = 0.0

    def add(self, graph: OrtGraph, run_before: float, calls_before: int) -> None:
        self.run[graph.spec.name] += graph.run_seconds - run_before
        self.calls[graph.spec.name] += graph.calls - calls_before


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images, rounded as diffusers rounds."""
    arr = np.clip(images.astype(np.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


class Pipeline:
    """Load once, call many times. `lean=True` keeps only one component's session alive at a time."""

    def __init__(
        self, artifacts: Path, manifest: dict[str, Any], providers: list[str] | None, lean: bool
    ) -> None:
        self.artifacts = Path(artifacts)
        self.manifest = manifest
        self.specs = manifest_specs(manifest)
        self.geometry = Geometry.from_json(manifest["geometry"])
        self.providers = providers
        self.lean = lean
        tok = manifest["tokenizer"]
        self.tokenizer = PromptTokenizer(
            self.artifacts / tok["file"], tok["max_length"], tok["pad_id"], tok["eos_id"]
        )
        self.scheduler_config = read_json(self.artifacts / manifest["scheduler_config"], "re-run the export")
        self._sessions: dict[str, OrtGraph] = {}

    @classmethod
    def load(
        cls,
        artifacts: str | Path,
        backend: str = "ort",
        providers: list[str] | None = None,
        lean: bool = False,
    ) -> Pipeline:
        if backend != "ort":
            raise EffdiffError(f"unknown backend {backend!r}; available: ort")
        artifacts = Path(artifacts)
        manifest = read_manifest(artifacts)
        check_complete(artifacts, manifest, ("text_encoder", "vae_decoder"))
        pipe = cls(artifacts, manifest, providers, lean)
        if not lean:
            for name in ("text_encoder", "vae_decoder"):
                pipe.open_session(name)
        return pipe

    # ------------------------------------------------------------ sessions

    def open_session(self, name: str) -> OrtGraph:
        """Create (or return) a graph's session now, e.g. so its load time stays out of a timed run."""
        if name not in self._sessions:
            check_complete(self.artifacts, self.manifest, (name,))
            self._sessions[name] = OrtGraph(
                graph_path(self.artifacts, name), self.specs[name], self.providers
            )
        return self._sessions[name]

    @contextlib.contextmanager
    def _using(self, names: tuple[str, ...], stats: _Stats) -> Iterator[dict[str, OrtGraph]]:
        """Sessions for one phase; in lean mode they are created here and released after."""
        graphs = {}
        for n in names:
            fresh = n not in self._sessions
            graphs[n] = self.open_session(n)
            if fresh:
                stats.load += graphs[n].load_seconds
        before = {n: (g.run_seconds, g.calls) for n, g in graphs.items()}
        try:
            yield graphs
        finally:
            for n, g in graphs.items():
                stats.add(g, *before[n])
            if self.lean:
                for n in names:
                    self._sessions.pop(n, None)
                graphs.clear()
                gc.collect()

    # ------------------------------------------------------------ generation

    def auto_decoder_batch(self) -> int:
        """Decoder steps per batch when the caller does not say: batching pays on GPUs; on CPU the
        per-row cost rises with batch (measured: 0.71 -> 0.89 s per step at 8 steps, SD1.5 arch)."""
        providers = self.providers or default_providers()
        return 8 if any(p in providers for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")) else 1

    def default_size(self) -> tuple[int, int]:
        size = self.manifest["export_size"]
        f = self.geometry.vae_factor
        return size["latent_height"] * f, size["latent_width"] * f

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str = "",
        steps: int = 50,
        sampler: str = "ddim",
        guidance_scale: float = 7.5,
        seed: int | None = 0,
        latents: np.ndarray | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images: int = 1,
        propagation: KeySchedule | str = "none",
        max_decoder_batch: int | None = None,
        noise_injection: NoiseInjection | None = DEFAULT_INJECTION,
        vae_tile: int | None = None,
        progress: bool = False,
    ) -> GenerationResult:
        schedule = KeySchedule.parse(propagation) if isinstance(propagation, str) else propagation
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if num_images < 1 or not prompts:
            raise EffdiffError("need at least one prompt and num_images >= 1")
        batch = len(prompts) * num_images
        geom = self.geometry
        default_h, default_w = self.default_size()
        height, width = height or default_h, width or default_w
        multiple = geom.unet_factor * geom.vae_factor
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise EffdiffError(
                f"height and width must be positive multiples of {multiple}, got {height}x{width}"
            )
        lat_shape = (batch, geom.latent_channels, height // geom.vae_factor, width // geom.vae_factor)
        scheduler = make_scheduler(sampler, self.scheduler_config)
        scheduler.set_timesteps(steps)
        if max_decoder_batch is None:
            max_decoder_batch = self.auto_decoder_batch()
        groups = schedule.groups(steps, max_decoder_batch)  # validates key steps against `steps`
        keys = frozenset(schedule.key_steps(steps))
        # `latents` are unit-variance noise, scaled by the sampler's initial sigma as diffusers does.
        if latents is None:
            unit_noise = np.random.default_rng(seed).standard_normal(lat_shape).astype(np.float32)
        elif tuple(latents.shape) != lat_shape:
            raise EffdiffError(f"latents must have shape {lat_shape}, got {tuple(latents.shape)}")
        else:
            unit_noise = latents.astype(np.float32)
        latents = unit_noise * np.float32(scheduler.init_noise_sigma)
        cfg = guidance_scale > 1.0
        stats = _Stats()
        float_dtype = np.dtype(self.manifest["recipe"]["float_dtype"])

        with PeakRSS() as mem:
            start = time.perf_counter()
            with self._using(("text_encoder",), stats) as g:
                rows = [p for p in prompts for _ in range(num_images)]
                texts = [negative_prompt] * batch + rows if cfg else rows
                ehs = g["text_encoder"].run({"input_ids": self.tokenizer(texts)})["last_hidden_state"]
            n_rows = ehs.shape[0]

            def guided(noise: np.ndarray) -> np.ndarray:
                noise = noise.astype(np.float32)
                if not cfg:
                    return noise
                uncond, text = noise[:batch], noise[batch:]
                return uncond + np.float32(guidance_scale) * (text - uncond)

            def model_input(x: np.ndarray, i: int) -> np.ndarray:
                x = np.concatenate([x, x]) if cfg else x
                return scheduler.scale_model_input(x, i).astype(float_dtype)

            def timesteps(i: int, n: int) -> np.ndarray:
                return np.full((n,), scheduler.timesteps[i], dtype=np.float32)

            bar = tqdm(total=steps, desc="denoise", unit="step", disable=not progress)
            x = latents
            if not schedule.propagates:
                with self._using(("unet",), stats) as g:
                    for i in range(steps):
                        feeds = {
                            "sample": model_input(x, i),
                            "timestep": timesteps(i, n_rows),
                            "encoder_hidden_states": ehs,
                        }
                        x = scheduler.step(guided(g["unet"].run(feeds)["noise_pred"]), i, x)
                        bar.update()
            else:
                with self._using(("unet_encoder", "unet_decoder"), stats) as g:
                    features: dict[str, np.ndarray] = {}
                    for group in groups:
                        if group[0] in keys:
                            feeds = {
                                "sample": model_input(x, group[0]),
                                "timestep": timesteps(group[0], n_rows),
                                "encoder_hidden_states": ehs,
                            }
                            features = g["unet_encoder"].run(feeds)
                        k = len(group)
                        # One decoder batch for k steps: rows step-major, each with its own timestep.
                        dec_feeds = {
                            name: np.concatenate([v] * k) if k > 1 else v for name, v in features.items()
                        }
                        dec_feeds["encoder_hidden_states"] = np.concatenate([ehs] * k) if k > 1 else ehs
                        dec_feeds["timestep"] = np.concatenate([timesteps(i, n_rows) for i in group])
                        out = g["unet_decoder"].run(dec_feeds)["noise_pred"]
                        for j, i in enumerate(group):
                            x = scheduler.step(guided(out[j * n_rows : (j + 1) * n_rows]), i, x)
                            if noise_injection is not None and scheduler.timesteps[i] < noise_injection.tau:
                                x = x + np.float32(noise_injection.alpha) * unit_noise
                            bar.update()
            bar.close()

            with self._using(("vae_decoder",), stats) as g:
                vae = g["vae_decoder"]
                images = (
                    tiled_decode(vae, x.astype(float_dtype), vae_tile, geom.vae_factor)
                    if vae_tile
                    else vae.run({"latent": x.astype(float_dtype)})["image"]
                )
            total = time.perf_counter() - start

        timings = {k: round(v, 6) for k, v in stats.run.items()}
        timings["overhead"] = max(0.0, total - stats.load - sum(stats.run.values()))
        timings["total"] = total
        timings["load"] = stats.load
        return GenerationResult(
            to_pil(images), x, timings, dict(stats.calls), mem.peak_gib, tuple(sorted(keys))
        )


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
    from effdiff.artifacts import atomic_path

    img = images[0] if len(images) == 1 else image_grid(images)
    with atomic_path(Path(path)) as tmp:
        img.save(tmp, format="PNG")


def tiled_decode(
    vae: OrtGraph, latents: np.ndarray, tile: int, factor: int, overlap: int | None = None
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
