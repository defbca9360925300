"""Samplers in numpy that reproduce diffusers' DDIM, DPM-Solver++ (2M) and Euler discrete schedulers.

Options come from the exported scheduler config, read the way diffusers reads them: keys of the chosen
scheduler class are used (class defaults when absent), keys of other classes are ignored, and an
option this runtime does not implement is refused by name when its value differs from the default.
Steps are addressed by index, never by searching the timestep list.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from effdiff.errors import EffdiffError

SAMPLERS = ("ddim", "dpmpp-2m", "euler")

_COMMON = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
# Options diffusers' classes take that this runtime does not implement: their defaults only.
_UNSUPPORTED = {
    "thresholding": False,
    "rescale_betas_zero_snr": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "variance_type": None,
    "sigma_min": None,
    "sigma_max": None,
    "interpolation_type": "linear",
    "timestep_type": "discrete",
    "lambda_min_clipped": -math.inf,
}


def _betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> np.ndarray:
    """The squaredcos_cap_v2 (cosine) schedule."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])


class Scheduler(ABC):
    """timesteps[i] is what the UNet gets at step i; step(i, ...) moves the sample from step i to i+1."""

    name: str
    defaults: ClassVar[dict[str, Any]]

    def __init__(self, config: dict[str, Any]) -> None:
        known = {**_COMMON, **self.defaults}
        cfg = {k: config.get(k, v) for k, v in known.items()}
        for key, default in _UNSUPPORTED.items():
            if (
                key in known
                and cfg[key] != default
                and not (isinstance(default, float) and cfg[key] is not None and float(cfg[key]) == default)
            ):
                raise EffdiffError(
                    f"scheduler option {key}={cfg[key]!r} is not supported by the {self.name} sampler "
                    f"of this runtime (supported: {default!r})"
                )
        if cfg["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
            raise EffdiffError(
                f"scheduler option prediction_type={cfg['prediction_type']!r} is not supported"
            )
        if cfg.get("timestep_spacing") not in (None, "leading", "trailing", "linspace"):
            raise EffdiffError(
                f"scheduler option timestep_spacing={cfg['timestep_spacing']!r} is not supported"
            )
        self.config = cfg
        n = int(cfg["num_train_timesteps"])
        if cfg["trained_betas"] is not None:
            betas = np.asarray(cfg["trained_betas"], dtype=np.float64)
        elif cfg["beta_schedule"] == "linear":
            betas = np.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=np.float64)
        elif cfg["beta_schedule"] == "scaled_linear":
            betas = np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=np.float64) ** 2
        elif cfg["beta_schedule"] == "squaredcos_cap_v2":
            betas = _betas_for_alpha_bar(n)
        else:
            raise EffdiffError(f"scheduler option beta_schedule={cfg['beta_schedule']!r} is not supported")
        # diffusers keeps these in float32; so do we, to follow its rounding.
        self.alphas_cumprod = np.cumprod(1.0 - betas.astype(np.float32), dtype=np.float32).astype(np.float64)
        self.num_train_timesteps = n
        self.timesteps = np.zeros(0)
        self.num_inference_steps = 0

    @property
    def prediction_type(self) -> str:
        return str(self.config["prediction_type"])

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sample

    @abstractmethod
    def set_timesteps(self, num_inference_steps: int) -> None: ...

    @abstractmethod
    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray: ...

    def select_rows(self, rows: np.ndarray) -> Scheduler:
        """A copy whose per-image state keeps only batch `rows` (a retrieval start continues some images
        of a batch from where they are and restarts the others). Single-step samplers have none."""
        return copy.copy(self)

    def _check_steps(self, n: int) -> None:
        if n < 1:
            raise EffdiffError(f"steps must be >= 1, got {n}")
        if n > self.num_train_timesteps:
            raise EffdiffError(f"steps must be <= {self.num_train_timesteps} (num_train_timesteps), got {n}")


class DDIMScheduler(Scheduler):
    """Deterministic DDIM (eta = 0)."""

    name = "ddim"
    defaults: ClassVar[dict[str, Any]] = {
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "thresholding": False,
        "timestep_spacing": "leading",
    }

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._check_steps(num_inference_steps)
        n, total = num_inference_steps, self.num_train_timesteps
        spacing = self.config["timestep_spacing"]
        if spacing == "linspace":
            ts = np.linspace(0, total - 1, n).round()[::-1]
        elif spacing == "leading":
            ts = (np.arange(0, n) * (total // n)).round()[::-1] + self.config["steps_offset"]
        else:
            ts = np.round(np.arange(total, 0, -total / n)) - 1
        self.timesteps = ts.astype(np.int64)
        self.num_inference_steps = n
        self.final_alpha_cumprod = 1.0 if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        t = int(self.timesteps[i])
        prev_t = t - self.num_train_timesteps // self.num_inference_steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        x0, eps = predicted_x0_eps(self.prediction_type, model_output, sample, a_t)
        if self.config["clip_sample"]:
            r = self.config["clip_sample_range"]
            x0 = np.clip(x0, -r, r)
        return (math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps).astype(sample.dtype)


def predicted_x0_eps(
    kind: str, out: np.ndarray, sample: np.ndarray, a_t: float
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted clean sample and noise from the model output, by prediction type, for a
    variance-preserving `sample` = sqrt(a_t) x0 + sqrt(1 - a_t) eps. The one place every sampler
    (and retrieval start) turns a model output into x0."""
    sa, sb = math.sqrt(a_t), math.sqrt(1 - a_t)
    if kind == "epsilon":
        return (sample - sb * out) / sa, out
    if kind == "sample":
        return out, (sample - sa * out) / sb
    return sa * sample - sb * out, sa * out + sb * sample  # v_prediction


class EulerDiscreteScheduler(Scheduler):
    """Euler (no churn), sigma-parameterised like k-diffusion; the model input is scaled."""

    name = "euler"
    defaults: ClassVar[dict[str, Any]] = {
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
    }

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._check_steps(num_inference_steps)
        n, total = num_inference_steps, self.num_train_timesteps
        spacing = self.config["timestep_spacing"]
        if spacing == "linspace":
            ts = np.linspace(0, total - 1, n, dtype=np.float64)[::-1]
        elif spacing == "leading":
            ts = (np.arange(0, n) * (total // n)).round()[::-1].astype(np.float32) + self.config[
                "steps_offset"
            ]
        else:
            ts = np.arange(total, 0, -total / n).round().astype(np.float32) - 1
        all_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        sigmas = np.interp(ts, np.arange(0, len(all_sigmas)), all_sigmas)
        last = 0.0 if self.config["final_sigmas_type"] == "zero" else all_sigmas[0]
        if self.config["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise EffdiffError(
                f"scheduler option final_sigmas_type={self.config['final_sigmas_type']!r} is not supported"
            )
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32).astype(np.float64)
        self.timesteps = ts.astype(np.float32)
        self.num_inference_steps = n

    @property
    def init_noise_sigma(self) -> float:
        top = float(self.sigmas.max())
        return top if self.config["timestep_spacing"] in ("linspace", "trailing") else (top**2 + 1) ** 0.5

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return (sample / ((self.sigmas[i] ** 2 + 1) ** 0.5)).astype(sample.dtype)

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        sigma = self.sigmas[i]
        # k-diffusion's sample is x0 + sigma * eps; in variance-preserving terms it is scaled by
        # 1/sqrt(sigma^2 + 1) at alpha_bar = 1/(sigma^2 + 1).
        scale = (sigma**2 + 1) ** 0.5
        x0, _ = predicted_x0_eps(self.prediction_type, model_output, sample / scale, 1.0 / scale**2)
        derivative = (sample - x0) / sigma
        return (sample + derivative * (self.sigmas[i + 1] - sigma)).astype(sample.dtype)


class DPMSolverMultistepScheduler(Scheduler):
    """DPM-Solver++ multistep, order 1 or 2 (2M), midpoint or heun, lower-order final steps."""

    name = "dpmpp-2m"
    defaults: ClassVar[dict[str, Any]] = {
        "solver_order": 2,
        "thresholding": False,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf,
        "variance_type": None,
        "timestep_spacing": "linspace",
        "use_dynamic_shifting": False,
    }

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        cfg = self.config
        checks = {
            "algorithm_type": ("dpmsolver++",),
            "solver_order": (1, 2),
            "solver_type": ("midpoint", "heun"),
            "final_sigmas_type": ("zero", "sigma_min"),
        }
        for key, allowed in checks.items():
            if cfg[key] not in allowed:
                raise EffdiffError(
                    f"scheduler option {key}={cfg[key]!r} is not supported by the dpmpp-2m "
                    f"sampler (supported: {', '.join(map(repr, allowed))})"
                )

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._check_steps(num_inference_steps)
        n, total = num_inference_steps, self.num_train_timesteps
        spacing = self.config["timestep_spacing"]
        if spacing == "linspace":
            ts = np.linspace(0, total - 1, n + 1).round()[::-1][:-1]
        elif spacing == "leading":
            ts = (np.arange(0, n + 1) * (total // (n + 1))).round()[::-1][:-1] + self.config["steps_offset"]
        else:
            ts = np.arange(total, 0, -total / n).round() - 1
        ts = ts.astype(np.int64)
        all_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        sigmas = np.interp(ts, np.arange(0, len(all_sigmas)), all_sigmas)
        last = 0.0 if self.config["final_sigmas_type"] == "zero" else all_sigmas[0]
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32).astype(np.float64)
        self.timesteps = ts
        self.num_inference_steps = len(ts)
        self.model_outputs: list[np.ndarray | None] = [None] * self.config["solver_order"]
        self.lower_order_nums = 0

    def select_rows(self, rows: np.ndarray) -> Scheduler:
        out = copy.copy(self)
        out.model_outputs = [None if m is None else m[rows] for m in self.model_outputs]
        return out

    @staticmethod
    def _alpha_sigma(sigma: float) -> tuple[float, float]:
        alpha = 1.0 / (sigma**2 + 1) ** 0.5
        return alpha, sigma * alpha

    def _lambda(self, sigma: float) -> tuple[float, float, float]:
        alpha, s = self._alpha_sigma(sigma)
        lam = math.inf if s == 0 else math.log(alpha) - math.log(s)
        return alpha, s, lam

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        cfg = self.config
        n = len(self.timesteps)
        lower_final = i == n - 1 and (
            cfg["euler_at_final"]
            or (cfg["lower_order_final"] and n < 15)
            or cfg["final_sigmas_type"] == "zero"
        )
        alpha_s0, sigma_s0, lam_s0 = self._lambda(self.sigmas[i])
        x0, _ = predicted_x0_eps(self.prediction_type, model_output, sample, alpha_s0**2)
        self.model_outputs = [*self.model_outputs[1:], x0]
        alpha_t, sigma_t, lam_t = self._lambda(self.sigmas[i + 1])
        h = lam_t - lam_s0
        phi = math.expm1(-h) if math.isfinite(h) else -1.0  # exp(-h) - 1; the final step to sigma 0 gives -1
        if cfg["solver_order"] == 1 or self.lower_order_nums < 1 or lower_final:
            out = (sigma_t / sigma_s0) * sample - alpha_t * phi * x0
        else:
            m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
            assert m0 is not None and m1 is not None
            _, _, lam_s1 = self._lambda(self.sigmas[i - 1])
            r0 = (lam_s0 - lam_s1) / h
            d1 = (1.0 / r0) * (m0 - m1)
            out = (sigma_t / sigma_s0) * sample - alpha_t * phi * m0
            if cfg["solver_type"] == "midpoint":
                out = out - 0.5 * alpha_t * phi * d1
            else:
                out = out + alpha_t * (phi / h + 1.0) * d1
        if self.lower_order_nums < cfg["solver_order"]:
            self.lower_order_nums += 1
        return out.astype(sample.dtype)


_CLASSES: dict[str, type[Scheduler]] = {
    "ddim": DDIMScheduler,
    "dpmpp-2m": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}


def sampler_class(sampler: str) -> type[Scheduler]:
    """The scheduler class of a sampler name; EffdiffError listing the choices when unknown."""
    try:
        return _CLASSES[sampler]
    except KeyError:
        raise EffdiffError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}") from None


def make_scheduler(sampler: str, config: dict[str, Any]) -> Scheduler:
    """A sampler by name, configured from the exported scheduler config; EffdiffError when the config
    lacks a value or holds one of the wrong type."""
    cls = sampler_class(sampler)
    try:
        return cls(config)
    except (TypeError, ValueError, KeyError) as exc:
        raise EffdiffError(
            f"the scheduler config does not fit the {sampler} sampler ({type(exc).__name__}: {exc}); "
            "re-run the export"
        ) from None
