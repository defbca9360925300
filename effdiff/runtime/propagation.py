"""Encoder propagation (Faster Diffusion): which steps run the UNet encoder, how decoder calls batch.

At a key step the encoder runs on the current latents; every step until the next key step reuses its
mid/skip features. Those decoder calls depend only on the features, the text embedding and their own
timesteps, so they run as one batch (bounded by `max_decoder_batch` steps) before the scheduler walks
through their outputs in order.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

from effdiff.errors import EffdiffError

# Faster Diffusion's DDIM-50 key steps (paper, SD1.5).
_PRESETS: dict[str, tuple[int, tuple[int, ...]]] = {
    "fd-ddim50": (50, (0, 1, 2, 3, 5, 10, 15, 25, 35)),
    # Ours for DPM-Solver++ at 20 steps: the same shape (dense early, sparse late), 10 of 20 steps.
    "fd-dpm20": (20, (0, 1, 2, 3, 4, 6, 8, 10, 13, 16)),
}


# What a non-key step reuses. "fd": encoder propagation (the key step's encoder features; the decoder
# runs at every step). "cache": DeepCache's recipe (the key step's deep feature; only the shallow
# outer layers run at the other steps).
RECIPES = ("fd", "cache")
MAX_STEPS = 10_000  # schedulers allow at most num_train_timesteps (1000 for SD); this bounds the check
CACHE_PREFIX = "cache:"


@dataclass(frozen=True)
class KeySchedule:
    """Which steps are key steps, and what the others reuse from them. Key steps: explicit indices,
    every k-th step (`uniform`), a named preset, or `none` (the whole UNet at every step)."""

    kind: str  # "none" | "uniform" | "explicit" | "preset"
    every: int = 0
    steps: tuple[int, ...] = ()
    name: str = ""
    recipe: str = "fd"  # one of RECIPES

    @classmethod
    def none(cls) -> KeySchedule:
        return cls("none")

    @classmethod
    def uniform(cls, k: int) -> KeySchedule:
        if k < 1:
            raise EffdiffError(f"uniform key-step interval must be >= 1, got {k}")
        return cls("uniform", every=k)

    @classmethod
    def explicit(cls, steps: tuple[int, ...]) -> KeySchedule:
        return cls("explicit", steps=tuple(steps))

    @classmethod
    def preset(cls, name: str) -> KeySchedule:
        if name not in _PRESETS:
            raise EffdiffError(f"unknown key-step preset {name!r}; presets: {', '.join(_PRESETS)}")
        return cls("preset", steps=_PRESETS[name][1], name=name)

    @classmethod
    def parse(cls, text: str) -> KeySchedule:
        """`none`, `uniform:K`, a preset name, or comma-separated step indices such as `0,1,2,5`; with
        the prefix `cache:`, DeepCache's recipe on those key steps (`cache:3` = every 3rd step)."""
        if not isinstance(text, str):
            raise EffdiffError(f"a key-step schedule is text, got {type(text).__name__}")
        text = text.strip()
        if text.startswith(CACHE_PREFIX):
            rest = text[len(CACHE_PREFIX) :].strip()
            inner = cls.uniform(int(rest)) if rest.isdigit() else cls.parse(rest)
            if not inner.propagates:
                raise EffdiffError(f"bad schedule {text!r}: use cache:N (every N-th step) or cache:0,3,6")
            return dataclasses.replace(inner, recipe="cache")
        if text == "none":
            return cls.none()
        if text.startswith("uniform:"):
            try:
                return cls.uniform(int(text.split(":", 1)[1]))
            except ValueError:
                raise EffdiffError(
                    f"bad key-step schedule {text!r}: expected uniform:K with an integer K"
                ) from None
        if text in _PRESETS:
            return cls.preset(text)
        try:
            return cls.explicit(tuple(int(s) for s in text.split(",") if s.strip()))
        except ValueError:
            raise EffdiffError(
                f"bad key-step schedule {text!r}: use none, uniform:K, {', '.join(_PRESETS)}, "
                "or indices like 0,1,2,5"
            ) from None

    def __str__(self) -> str:
        if self.caches:
            inner = str(self.every) if self.kind == "uniform" else str(dataclasses.replace(self, recipe="fd"))
            return CACHE_PREFIX + inner
        if self.kind == "uniform":
            return f"uniform:{self.every}"
        if self.kind == "explicit":
            return ",".join(map(str, self.steps))
        return self.name or self.kind

    @property
    def propagates(self) -> bool:
        """Encoder propagation: the encoder at key steps, the decoder at every step."""
        return self.kind != "none" and self.recipe == "fd"

    @property
    def caches(self) -> bool:
        """DeepCache's recipe: the whole UNet (keeping its deep feature) at key steps, the shallow
        path around that feature at the others."""
        return self.kind != "none" and self.recipe == "cache"

    @property
    def graphs(self) -> tuple[str, ...]:
        """The UNet graphs a run on this schedule uses."""
        if self.caches:
            return ("unet_deep", "unet_shallow")
        return ("unet_encoder", "unet_decoder") if self.propagates else ("unet",)

    def key_steps(self, num_steps: int) -> tuple[int, ...]:
        """Sorted key-step indices for a run of `num_steps`; EffdiffError when they do not fit it."""
        if num_steps < 1:
            raise EffdiffError(f"steps must be >= 1, got {num_steps}")
        if num_steps > MAX_STEPS:
            raise EffdiffError(f"steps must be <= {MAX_STEPS}, got {num_steps}")
        if self.kind in ("none",):
            return tuple(range(num_steps))
        if self.kind == "uniform":
            return tuple(range(0, num_steps, self.every))
        if self.kind == "preset" and _PRESETS[self.name][0] != num_steps:
            raise EffdiffError(
                f"preset {self.name} is for {_PRESETS[self.name][0]} steps, not {num_steps}; "
                "use uniform:K or explicit indices"
            )
        steps = sorted(set(self.steps))
        if not steps or steps[0] != 0:
            raise EffdiffError(f"key steps must start at 0 (the first step needs the encoder), got {self}")
        if steps[-1] >= num_steps:
            raise EffdiffError(
                f"key step {steps[-1]} is out of range for {num_steps} steps (0..{num_steps - 1})"
            )
        return tuple(steps)

    def run_keys(self, num_steps: int, start: int = 0, stop: int | None = None) -> tuple[int, ...]:
        """Key steps of a run over steps [start, stop): the schedule's, plus `start` itself, since a run
        that begins mid-schedule (retrieval start, a resumed run) has no features to reuse yet."""
        stop = num_steps if stop is None else stop
        if not 0 <= start < stop <= num_steps:
            raise EffdiffError(f"steps [{start}, {stop}) are not a range within 0..{num_steps}")
        keys = [k for k in self.key_steps(num_steps) if start <= k < stop]
        return tuple(sorted({start, *keys}))

    def groups(
        self, num_steps: int, max_decoder_batch: int, start: int = 0, stop: int | None = None
    ) -> list[tuple[int, ...]]:
        """Step indices whose decoder calls run as one call: each group shares one key step's features."""
        if max_decoder_batch < 1:
            raise EffdiffError(f"max decoder batch must be >= 1, got {max_decoder_batch}")
        stop = num_steps if stop is None else stop
        bounds = [*self.run_keys(num_steps, start, stop), stop]
        out = []
        for first, end in itertools.pairwise(bounds):
            span = tuple(range(first, end))
            out += [span[i : i + max_decoder_batch] for i in range(0, len(span), max_decoder_batch)]
        return out

    def allowed_speedup(self, num_steps: int, encoder_s: float, decoder_s: float) -> float:
        """UNet speed-up the schedule allows in principle: each step pays a decoder, key steps an encoder."""
        keys = len(self.key_steps(num_steps))
        return num_steps * (encoder_s + decoder_s) / (keys * encoder_s + num_steps * decoder_s)


@dataclass(frozen=True)
class NoiseInjection:
    """Prior noise injection: z <- z + alpha * z_T after steps whose timestep is below tau."""

    alpha: float = 0.003
    tau: float = 500.0

    def __post_init__(self) -> None:
        for name in ("alpha", "tau"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise EffdiffError(f"noise injection {name} must be a finite number, got {value!r}")
        if self.alpha < 0:
            raise EffdiffError(f"noise injection alpha must be >= 0, got {self.alpha}")


# Faster Diffusion's prior noise injection, the default with encoder propagation.
DEFAULT_INJECTION = NoiseInjection()
AUTO = "auto"


def resolve_injection(value: NoiseInjection | str | None, schedule: KeySchedule) -> NoiseInjection | None:
    """`"auto"`: Faster Diffusion's injection when the schedule propagates, none otherwise; None: off;
    a NoiseInjection: applied on every path, the whole-UNet one included."""
    if value is None or isinstance(value, NoiseInjection):
        return value if value is None or value.alpha > 0 else None
    if value == AUTO:
        return DEFAULT_INJECTION if schedule.propagates else None
    raise EffdiffError(f"noise_injection must be 'auto', None or a NoiseInjection, got {value!r}")
