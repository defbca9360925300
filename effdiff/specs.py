"""One spec per exported graph: IO names, dtypes, dynamic axes, concrete shapes, sample inputs, shape ranges.

Torch-free: export, validation, calibration, engine profiles and the runtime all read the same spec,
rebuilt from the manifest's geometry, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

GRAPHS = ("text_encoder", "unet_encoder", "unet_decoder", "unet", "vae_decoder")


@dataclass(frozen=True)
class Axis:
    """A dimension: fixed (`size`) or symbolic, as base * mul // div (base: batch, height, width)."""

    base: str | None = None  # None => fixed size
    size: int = 0
    div: int = 1
    mul: int = 1

    @property
    def name(self) -> str:
        if self.base is None:
            return str(self.size)
        name = self.base if self.base == "batch" else f"latent_{self.base}"
        if self.mul != 1:
            name = f"{self.base}_x{self.mul}"
        if self.div != 1:
            name = f"{name}_div{self.div}"
        return name

    def resolve(self, dims: dict[str, int]) -> int:
        return self.size if self.base is None else dims[self.base] * self.mul // self.div


def fixed(n: int) -> Axis:
    return Axis(size=n)


BATCH = Axis("batch")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    axes: tuple[Axis, ...]

    def shape(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(a.resolve(dims) for a in self.axes)

    def symbolic_shape(self) -> list[str | int]:
        return [a.size if a.base is None else a.name for a in self.axes]


@dataclass(frozen=True)
class Geometry:
    """What the specs need to know about a model; stored in the manifest (plain JSON)."""

    latent_channels: int
    unet_factor: int  # latents must be a multiple of this (2 ** number of UNet downsamplers)
    vae_factor: int  # image pixels per latent pixel
    text_len: int
    text_hidden: int
    # skip tensors in encoder output order: (channels, downsampling level)
    skips: tuple[tuple[int, int], ...]
    mid_channels: int
    mid_level: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Geometry:
        data = dict(data)
        data["skips"] = tuple(tuple(s) for s in data["skips"])
        return cls(**data)

    def check_latent_size(self, height: int, width: int) -> None:
        if height % self.unet_factor or width % self.unet_factor:
            f = self.unet_factor * self.vae_factor
            raise ValueError(
                f"image size {height * self.vae_factor}x{width * self.vae_factor} is not a multiple of {f}"
            )


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # float dtype the graph was exported in; sample inputs follow it
    float_dtype: str = "float32"
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        out: dict[str, dict[int, str]] = {}
        for t in (*self.inputs, *self.outputs):
            dyn = {i: a.name for i, a in enumerate(t.axes) if a.base is not None}
            if dyn:
                out[t.name] = dyn
        return out

    def input_shapes(self, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        """Concrete input shapes for a batch and a latent height/width."""
        dims = {"batch": batch, "height": height, "width": width}
        return {t.name: t.shape(dims) for t in self.inputs}

    def output_shapes(self, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        dims = {"batch": batch, "height": height, "width": width}
        return {t.name: t.shape(dims) for t in self.outputs}

    def shape_ranges(
        self, min_dims: tuple[int, int, int], opt_dims: tuple[int, int, int], max_dims: tuple[int, int, int]
    ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shape per input from (batch, latent_h, latent_w) triples: TensorRT profiles."""
        mins, opts, maxs = (self.input_shapes(*d) for d in (min_dims, opt_dims, max_dims))
        return {n: (mins[n], opts[n], maxs[n]) for n in self.input_names}

    def check_inputs(self, feeds: dict[str, np.ndarray]) -> None:
        """Raise ValueError naming the input, expected and actual dtype/shape, before the backend fails."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"{self.name}: missing input(s) {', '.join(missing)}")
        for t in self.inputs:
            arr = feeds[t.name]
            want = [a.size if a.base is None else None for a in t.axes]
            ok = arr.dtype == np.dtype(t.dtype) and arr.ndim == len(want)
            ok = ok and all(w is None or w == s for w, s in zip(want, arr.shape, strict=False))
            if not ok:
                shape = "(" + ",".join(str(s) for s in t.symbolic_shape()) + ")"
                raise ValueError(
                    f"{self.name}: expected {t.dtype} {shape} for `{t.name}`, "
                    f"got {arr.dtype} {tuple(arr.shape)}"
                )

    def sample_inputs(
        self,
        batch: int,
        height: int,
        width: int,
        rng: np.random.Generator,
        timesteps: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Realistic random inputs: latents ~ N(0,1), timesteps from the caller's scheduler, ids in vocab."""
        shapes = self.input_shapes(batch, height, width)
        feeds: dict[str, np.ndarray] = {}
        for t in self.inputs:
            shape = shapes[t.name]
            if t.name == "input_ids":
                vocab = int(self.meta.get("vocab_size", 1000))
                feeds[t.name] = rng.integers(0, vocab, size=shape).astype(t.dtype)
            elif t.name == "timestep":
                ts = timesteps if timesteps is not None else rng.integers(1, 1000, size=shape)
                feeds[t.name] = np.resize(np.asarray(ts), shape).astype(t.dtype)
            else:
                feeds[t.name] = rng.standard_normal(shape).astype(t.dtype)
        return feeds

    def to_json(self) -> dict[str, Any]:
        def tensors(ts: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
            return [{"name": t.name, "dtype": t.dtype, "shape": t.symbolic_shape()} for t in ts]

        return {"inputs": tensors(self.inputs), "outputs": tensors(self.outputs)}


def skip_names(geom: Geometry) -> list[str]:
    return [f"skip_{i:02d}" for i in range(len(geom.skips))]


def _latent(name: str, channels: int, level: int, dtype: str) -> TensorSpec:
    div = 2**level
    return TensorSpec(name, dtype, (BATCH, fixed(channels), Axis("height", div=div), Axis("width", div=div)))


def build_specs(
    geom: Geometry, float_dtype: str = "float32", vocab_size: int = 49408
) -> dict[str, GraphSpec]:
    """The five graphs' specs. Timesteps are float32 per row so a decoder batch can mix steps."""
    f = float_dtype
    timestep = TensorSpec("timestep", "float32", (BATCH,))
    ehs = TensorSpec("encoder_hidden_states", f, (BATCH, fixed(geom.text_len), fixed(geom.text_hidden)))
    sample = _latent("sample", geom.latent_channels, 0, f)
    noise = _latent("noise_pred", geom.latent_channels, 0, f)
    mid = _latent("mid", geom.mid_channels, geom.mid_level, f)
    skips = tuple(_latent(n, c, lv, f) for n, (c, lv) in zip(skip_names(geom), geom.skips, strict=True))
    image_axes = (
        BATCH,
        fixed(3),
        Axis("height", mul=geom.vae_factor),
        Axis("width", mul=geom.vae_factor),
    )
    return {
        "text_encoder": GraphSpec(
            "text_encoder",
            (TensorSpec("input_ids", "int64", (BATCH, fixed(geom.text_len))),),
            (TensorSpec("last_hidden_state", f, ehs.axes),),
            f,
            {"vocab_size": vocab_size},
        ),
        "unet_encoder": GraphSpec("unet_encoder", (sample, timestep, ehs), (mid, *skips), f),
        "unet_decoder": GraphSpec("unet_decoder", (timestep, ehs, mid, *skips), (noise,), f),
        "unet": GraphSpec("unet", (sample, timestep, ehs), (noise,), f),
        "vae_decoder": GraphSpec(
            "vae_decoder",
            (_latent("latent", geom.latent_channels, 0, f),),
            (TensorSpec("image", f, image_axes),),
            f,
        ),
    }
