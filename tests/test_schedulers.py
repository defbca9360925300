"""numpy samplers against diffusers' schedulers over whole trajectories, fed the same (closed-loop) model."""

from __future__ import annotations

import numpy as np
import pytest

from effdiff.errors import EffdiffError
from effdiff.runtime.schedulers import make_scheduler

SD1 = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}
# the reference model's schedule
DDPM_LINEAR = {
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "v_prediction",
}
CONFIGS = [
    ("ddim", SD1, 50),
    ("ddim", {**SD1, **DDPM_LINEAR}, 50),
    ("ddim", {**SD1, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 20),
    (
        "ddim",
        {
            "beta_schedule": "linear",
            "clip_sample": True,
            "set_alpha_to_one": True,
            "timestep_spacing": "linspace",
        },
        10,
    ),
    ("ddim", {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample", "clip_sample": False}, 7),
    ("dpmpp-2m", SD1, 20),
    ("dpmpp-2m", {**SD1, **DDPM_LINEAR}, 20),
    ("dpmpp-2m", {**SD1, "prediction_type": "v_prediction", "timestep_spacing": "leading"}, 10),
    (
        "dpmpp-2m",
        {**SD1, "solver_type": "heun", "timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"},
        25,
    ),
    ("dpmpp-2m", {**SD1, "solver_order": 1, "lower_order_final": False}, 8),
    ("euler", SD1, 30),
    ("euler", {**SD1, **DDPM_LINEAR}, 20),
    ("euler", {**SD1, "prediction_type": "v_prediction", "timestep_spacing": "leading"}, 15),
    ("euler", {**SD1, "timestep_spacing": "trailing"}, 12),
]


def fake_model(x: np.ndarray, t: float) -> np.ndarray:
    """A smooth stand-in for a UNet: depends on the sample and the timestep, so errors compound."""
    return (0.9 * np.tanh(x) + 0.1 * np.sin(t / 97.0 + x)).astype(np.float32)


@pytest.mark.parametrize(("sampler", "config", "steps"), CONFIGS)
def test_matches_diffusers_trajectory(sampler: str, config: dict, steps: int) -> None:
    torch = pytest.importorskip("torch")
    import diffusers

    ref_cls = {
        "ddim": diffusers.DDIMScheduler,
        "dpmpp-2m": diffusers.DPMSolverMultistepScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
    }[sampler]
    ref = ref_cls.from_config(config)
    ref.set_timesteps(steps)
    ours = make_scheduler(sampler, config)
    ours.set_timesteps(steps)
    np.testing.assert_array_equal(
        np.asarray(ours.timesteps, dtype=np.float64), ref.timesteps.numpy().astype(np.float64)
    )
    assert abs(ours.init_noise_sigma - float(ref.init_noise_sigma)) <= 1e-6 * float(ref.init_noise_sigma)

    x0 = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32) * ours.init_noise_sigma
    x_ours, x_ref = x0.copy(), torch.from_numpy(x0.copy())
    for i, t in enumerate(ref.timesteps):
        out_ref = fake_model(ref.scale_model_input(x_ref, t).numpy(), float(t))
        x_ref = ref.step(torch.from_numpy(out_ref), t, x_ref).prev_sample
        out_ours = fake_model(ours.scale_model_input(x_ours, i), float(ours.timesteps[i]))
        x_ours = ours.step(out_ours, i, x_ours)
        rel = np.linalg.norm(x_ours - x_ref.numpy()) / np.linalg.norm(x_ref.numpy())
        assert rel <= 1e-5, f"{sampler} step {i}/{steps} (t={int(t)}): relative error {rel:.2e}"


@pytest.mark.parametrize(
    ("sampler", "config", "name"),
    [
        ("ddim", {"thresholding": True}, "thresholding"),
        ("euler", {"use_karras_sigmas": True}, "use_karras_sigmas"),
        ("dpmpp-2m", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
        ("dpmpp-2m", {"solver_order": 3}, "solver_order"),
        ("ddim", {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ("euler", {"timestep_spacing": "karras"}, "timestep_spacing"),
    ],
)
def test_unsupported_options_are_refused_by_name(sampler: str, config: dict, name: str) -> None:
    with pytest.raises(EffdiffError, match=name):
        make_scheduler(sampler, config).set_timesteps(10)


def test_other_schedulers_keys_are_ignored_and_bad_values_refused() -> None:
    # a PNDM config (SD1.5 ships one) drives DDIM through the shared keys
    make_scheduler("ddim", {**SD1, "_class_name": "PNDMScheduler", "skip_prk_steps": True}).set_timesteps(5)
    with pytest.raises(EffdiffError, match="unknown sampler"):
        make_scheduler("plms", SD1)
    with pytest.raises(EffdiffError, match="steps must be >= 1"):
        make_scheduler("ddim", SD1).set_timesteps(0)
