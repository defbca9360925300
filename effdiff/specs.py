"""One spec per exported graph: IO names, dtypes, dynamic axes, concrete shapes, sample inputs, shape ranges.

Torch-free: export, validation, calibration, engine profiles and the runtime all read the same spec,
rebuilt from the manifest's geometry, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import numpy as np

# Every graph an export writes, in export order; the one place their names are listed.
GRAPHS = ("text_encoder", "unet_encoder", "unet_decoder", "unet", "unet_deep", "unet_shallow", "vae_decoder")
# The graphs with an INT8 form (`effdiff-export int8`); the others run in float at precision int8.
UNET_GRAPHS = ("unet_encoder", "unet_decoder", "unet", "unet_deep", "unet_shallow")


class Precision(str, Enum):
    """Numeric precision of a graph variant. INT8 graphs are QDQ graphs with float32 inputs/outputs."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"

    @property
    def float_dtype(self) -> str:
        """dtype of the graph's float inputs and outputs."""
        return "float16" if self is Precision.FP16 else "float32"

    @classmethod
    def parse(cls, text: str | Precision) -> Precision:
        try:
            return cls(text)
        except ValueError:
            raise ValueError(
                f"unknown precision {text!r}; choose one of {', '.join(p.value for p in cls)}"
            ) from None


@dataclass(frozen=True)
class Axis:
    """A dimension: fixed (`size`) or symbolic, as base * mul // div.

    Bases: `batch`, `height`, `width` (latent), and `rows`: a decoder call's rows, `steps x batch`,
    when the decoder runs several steps that share one key step's features in one call.
    """

    base: str | None = None  # None => fixed size
    size: int = 0
    div: int = 1
    mul: int = 1

    @property
    def name(self) -> str:
        if self.base is None:
            return str(self.size)
        name = self.base if self.base in ("batch", "rows") else f"latent_{self.base}"
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
ROWS = Axis("rows")


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
    # DeepCache's recipe: its branch, and the deep feature's channels and downsampling level
    cache_branch: int = 0
    deep_channels: int = 0
    deep_level: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Geometry:
        data = dict(data)
        data["skips"] = tuple(tuple(s) for s in data["skips"])
        return cls(**data)

    @property
    def pixel_multiple(self) -> int:
        """Image height and width must be positive multiples of this."""
        return self.unet_factor * self.vae_factor

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """Latent (h, w) of an image size; ValueError unless both are positive multiples of the factor."""
        f = self.pixel_multiple
        if height <= 0 or width <= 0 or height % f or width % f:
            raise ValueError(f"height and width must be positive multiples of {f}, got {height}x{width}")
        return height // self.vae_factor, width // self.vae_factor


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

    @property
    def has_rows(self) -> bool:
        """True for the decoder: its timesteps carry `steps x batch` rows over `batch` rows of features."""
        return any(a.base == "rows" for t in self.inputs for a in t.axes)

    @staticmethod
    def _dims(batch: int, height: int, width: int, steps: int) -> dict[str, int]:
        return {"batch": batch, "rows": batch * steps, "height": height, "width": width}

    def input_shapes(self, batch: int, height: int, width: int, steps: int = 1) -> dict[str, tuple[int, ...]]:
        """Concrete input shapes for a batch, a latent height/width and (decoder) steps per call."""
        dims = self._dims(batch, height, width, steps)
        return {t.name: t.shape(dims) for t in self.inputs}

    def output_shapes(
        self, batch: int, height: int, width: int, steps: int = 1
    ) -> dict[str, tuple[int, ...]]:
        dims = self._dims(batch, height, width, steps)
        return {t.name: t.shape(dims) for t in self.outputs}

    def shape_ranges(
        self,
        min_dims: tuple[int, int, int],
        opt_dims: tuple[int, int, int],
        max_dims: tuple[int, int, int],
        max_steps: int = 1,
    ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shape per input from (batch, latent_h, latent_w) triples: TensorRT profiles.
        The decoder's `rows` range up to `max_steps` x the largest batch (parallel decoding)."""
        mins = self.input_shapes(*min_dims)
        opts = self.input_shapes(*opt_dims)
        maxs = self.input_shapes(*max_dims, steps=max_steps)
        return {n: (mins[n], opts[n], maxs[n]) for n in self.input_names}

    def check_inputs(
        self,
        feeds: Mapping[str, Any],
        describe: Callable[[Any], tuple[np.dtype, tuple[int, ...]]] | None = None,
    ) -> None:
        """Raise ValueError naming the input, expected and actual dtype/shape, before the backend fails.

        `describe` gives (dtype, shape) of a backend's native value (an OrtValue, a torch tensor);
        numpy arrays need none. Symbolic axes must agree across inputs (one batch, one latent size).
        """
        describe = describe or (lambda a: (np.asarray(a).dtype, tuple(np.shape(a))))
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"{self.name}: missing input(s) {', '.join(missing)}")
        seen: dict[str, tuple[int, str]] = {}
        for t in self.inputs:
            dtype, shape = describe(feeds[t.name])
            want = [a.size if a.base is None else None for a in t.axes]
            ok = np.dtype(dtype) == np.dtype(t.dtype) and len(shape) == len(want)
            ok = ok and all(w is None or w == s for w, s in zip(want, shape, strict=False))
            if not ok:
                sym = "(" + ",".join(str(s) for s in t.symbolic_shape()) + ")"
                raise ValueError(
                    f"{self.name}: expected {t.dtype} {sym} for `{t.name}`, got {np.dtype(dtype)} {shape}"
                )
            for axis, size in zip(t.axes, shape, strict=True):
                if axis.base is None:
                    continue
                base_size = size * axis.div // axis.mul
                key = axis.base
                if key in seen and seen[key][0] != base_size:
                    raise ValueError(
                        f"{self.name}: `{t.name}` has {axis.name} {size}, which does not agree with "
                        f"`{seen[key][1]}`"
                    )
                seen.setdefault(key, (base_size, t.name))
        if "rows" in seen and "batch" in seen and seen["rows"][0] % max(seen["batch"][0], 1):
            raise ValueError(
                f"{self.name}: `{seen['rows'][1]}` has {seen['rows'][0]} rows, not a multiple of the "
                f"features' batch {seen['batch'][0]}"
            )

    def sample_inputs(
        self,
        batch: int,
        height: int,
        width: int,
        rng: np.random.Generator,
        timesteps: np.ndarray | None = None,
        steps: int = 1,
    ) -> dict[str, np.ndarray]:
        """Realistic random inputs: latents ~ N(0,1), timesteps from the caller's scheduler, ids in vocab."""
        shapes = self.input_shapes(batch, height, width, steps)
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
    """Every graph's spec. Timesteps are float32 per row so a decoder call can mix steps: its
    `timestep` has `rows` = steps x batch entries, and the graph repeats the features (and text
    embeddings) once per step inside, so no host ever copies them k times."""
    f = float_dtype
    timestep = TensorSpec("timestep", "float32", (BATCH,))
    rows_timestep = TensorSpec("timestep", "float32", (ROWS,))
    ehs = TensorSpec("encoder_hidden_states", f, (BATCH, fixed(geom.text_len), fixed(geom.text_hidden)))
    sample = _latent("sample", geom.latent_channels, 0, f)
    noise = _latent("noise_pred", geom.latent_channels, 0, f)
    rows_noise = TensorSpec("noise_pred", f, (ROWS, *noise.axes[1:]))
    mid = _latent("mid", geom.mid_channels, geom.mid_level, f)
    deep = _latent("deep", geom.deep_channels, geom.deep_level, f)
    branch = {"cache_branch": geom.cache_branch}  # which DeepCache branch the deep feature comes from
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
        "unet_decoder": GraphSpec("unet_decoder", (rows_timestep, ehs, mid, *skips), (rows_noise,), f),
        "unet": GraphSpec("unet", (sample, timestep, ehs), (noise,), f),
        "unet_deep": GraphSpec("unet_deep", (sample, timestep, ehs), (noise, deep), f, branch),
        "unet_shallow": GraphSpec("unet_shallow", (sample, timestep, ehs, deep), (noise,), f, branch),
        "vae_decoder": GraphSpec(
            "vae_decoder",
            (_latent("latent", geom.latent_channels, 0, f),),
            (TensorSpec("image", f, image_axes),),
            f,
        ),
    }
