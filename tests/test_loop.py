"""The denoising loop as parts: split runs, mid-schedule starts, hooks, backends and loading policies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from effdiff.errors import EffdiffError
from effdiff.runtime.backends import backend_names, get_backend
from effdiff.runtime.backends.ort import OrtBackend
from effdiff.runtime.pipeline import Hooks, Pipeline
from effdiff.runtime.propagation import NoiseInjection

from .test_cli import assert_one_line_error, run

STEPS = 12


@pytest.fixture(scope="module")
def pipe(sd1_artifacts: Path) -> Pipeline:
    return Pipeline.load(sd1_artifacts)


def start(pipe: Pipeline, sampler: str, propagation: str = "none"):
    cond = pipe.encode_prompt("a red circle", "blue", num_images=2, guidance_scale=6.0)
    plan = pipe.plan(STEPS, sampler, propagation, noise_injection=None)
    unit = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
    return cond, plan, unit * np.float32(plan.scheduler.init_noise_sigma)


@pytest.mark.parametrize(
    ("sampler", "propagation", "split"),
    [
        ("ddim", "none", 5),
        ("dpmpp-2m", "none", 5),
        ("euler", "none", 7),
        ("dpmpp-2m", "uniform:3", 6),  # a key step: the continuation's encoder call is the schedule's own
    ],
)
def test_split_run_reproduces_uninterrupted(
    pipe: Pipeline, sampler: str, propagation: str, split: int
) -> None:
    cond, plan, x = start(pipe, sampler, propagation)
    whole = pipe.denoise(x, cond, plan)
    _, plan2, _ = start(pipe, sampler, propagation)
    part = pipe.denoise(x, cond, plan2, stop_step=split)
    rest = pipe.denoise(part, cond, plan2, start_step=split)
    np.testing.assert_array_equal(rest, whole)
    # and __call__ is the same composition
    unit = x / np.float32(plan.scheduler.init_noise_sigma)
    res = pipe(
        "a red circle",
        "blue",
        steps=STEPS,
        sampler=sampler,
        guidance_scale=6.0,
        latents=unit,
        num_images=2,
        propagation=propagation,
        noise_injection=None,
    )
    np.testing.assert_array_equal(res.latents, whole)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp-2m", "euler"])
def test_fresh_plan_starts_mid_schedule(pipe: Pipeline, sampler: str) -> None:
    """Retrieval start: a new plan begun at step k from the latents of step k. Single-step samplers
    continue exactly; DPM-Solver++ has no history yet and takes a first-order step first."""
    cond, plan, x = start(pipe, sampler)
    part = pipe.denoise(x, cond, plan, stop_step=6)
    continued = pipe.denoise(part, cond, plan, start_step=6)
    _, fresh_plan, _ = start(pipe, sampler)
    fresh = pipe.denoise(part, cond, fresh_plan, start_step=6)
    assert np.isfinite(fresh).all()
    rel = np.linalg.norm(fresh - continued) / np.linalg.norm(continued)
    if sampler == "dpmpp-2m":
        assert 0 < rel < 0.05, f"restarted multistep history: relative difference {rel:.2e}"
    else:
        assert rel == 0.0


def test_key_schedule_begins_at_the_start_step(pipe: Pipeline) -> None:
    calls: list[str] = []
    hooks = Hooks(on_graph=lambda name, feeds: calls.append(name))
    cond, plan, x = start(pipe, "ddim", "uniform:5")
    pipe.denoise(x, cond, plan, start_step=2, hooks=hooks)  # keys 2 (the start), 5, 10
    assert calls.count("unet_encoder") == 3 and calls[0] == "unet_encoder"


def test_step_hook_sees_every_step_and_may_replace_latents(pipe: Pipeline) -> None:
    seen: list[tuple[int, float]] = []

    def on_step(i: int, t: float, latents: np.ndarray) -> np.ndarray | None:
        seen.append((i, t))
        return np.zeros_like(latents) if i == STEPS - 1 else None

    cond, plan, x = start(pipe, "ddim", "uniform:3")
    out = pipe.denoise(x, cond, plan, hooks=Hooks(on_step=on_step))
    assert [i for i, _ in seen] == list(range(STEPS))
    assert [t for _, t in seen] == [float(t) for t in plan.scheduler.timesteps]
    assert not out.any(), "the hook's latents replace the sampler's"


def test_graph_hook_records_what_each_half_sees(pipe: Pipeline) -> None:
    """Calibration capture's view: the decoder's mid/skip inputs and per-row timesteps, host arrays."""
    fed: dict[str, list[dict[str, np.ndarray]]] = {}
    hooks = Hooks(on_graph=lambda name, feeds: fed.setdefault(name, []).append(dict(feeds)))
    res = pipe(
        "a cat",
        steps=STEPS,
        latents=np.zeros((1, 4, 8, 8), np.float32),
        propagation="uniform:3",
        max_decoder_batch=3,
        hooks=hooks,
    )
    assert {n: len(v) for n, v in fed.items()} == {k: v for k, v in res.calls.items() if v}
    first = fed["unet_decoder"][0]
    assert {"mid", "skip_00", "timestep", "encoder_hidden_states"} <= set(first)
    assert first["timestep"].shape == (3 * 2,) and first["mid"].shape[0] == 2  # 3 steps x (uncond, cond)
    assert all(isinstance(v, np.ndarray) for v in first.values())


def test_io_binding_path_matches_plain_runs(sd1_artifacts: Path, pipe: Pipeline) -> None:
    """The IOBinding path (features kept as OrtValues, as on a GPU) gives the plain path's result."""
    bound = Pipeline.load(sd1_artifacts, backend=OrtBackend(io_binding=True))
    kwargs = dict(
        steps=8, latents=np.ones((1, 4, 8, 8), np.float32), propagation="uniform:2", max_decoder_batch=2
    )
    np.testing.assert_array_equal(bound("a dog", **kwargs).latents, pipe("a dog", **kwargs).latents)


def test_backend_registry_and_providers() -> None:
    assert "ort" in backend_names()
    with pytest.raises(EffdiffError, match="unknown backend 'nope'; available: ort"):
        get_backend("nope")
    with pytest.raises(EffdiffError, match="not available in this onnxruntime"):
        OrtBackend(providers=["NoSuchExecutionProvider"])


def test_explicit_noise_injection_applies_without_propagation(pipe: Pipeline) -> None:
    kwargs = dict(steps=STEPS, latents=np.ones((1, 4, 8, 8), np.float32))
    auto = pipe("a cat", **kwargs)  # "auto": no injection on the whole-UNet path
    off = pipe("a cat", noise_injection=None, **kwargs)
    on = pipe("a cat", noise_injection=NoiseInjection(0.003, 500.0), **kwargs)
    np.testing.assert_array_equal(auto.latents, off.latents)
    assert np.abs(on.latents - off.latents).max() > 0


def test_api_arguments_checked_at_the_boundary(pipe: Pipeline) -> None:
    bad = [
        (dict(guidance_scale=float("nan")), "finite"),
        (dict(guidance_scale=float("inf")), "finite"),
        (dict(height=0), "height must be >= 1"),
        (dict(steps=2.5), "steps must be an integer"),
        (dict(seed=-1), "seed must be >= 0"),
        (dict(vae_tile=-3), "vae_tile must be >= 1"),
        (dict(num_images=True), "num_images must be an integer"),
        (dict(latents=np.full((1, 4, 8, 8), np.nan, np.float32)), "NaN"),
        (dict(propagation=3), "propagation must be"),
    ]
    for kwargs, message in bad:
        with pytest.raises(EffdiffError, match=message):
            pipe("a cat", **{"steps": 2, **kwargs})
    with pytest.raises(EffdiffError, match="alpha must be a finite number"):
        NoiseInjection(float("nan"))
    with pytest.raises(EffdiffError, match="prompt must be"):
        pipe(["a", 3])  # type: ignore[list-item]


def test_schema_1_artifacts_name_the_command_to_re_export(sd1_artifacts: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(sd1_artifacts, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 1}))
    proc = run(
        "effdiff", "generate", "--artifacts", str(old), "--prompt", "p", "--out", str(tmp_path / "o.png")
    )
    assert_one_line_error(proc, "effdiff-export onnx --model MODEL --out")
