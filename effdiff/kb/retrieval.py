"""Retrieval start: generate with a knowledge base, skipping the steps a retrieved trajectory covers.

This drives the pipeline's public parts (encode_prompt, plan, denoise, decode) and lives here, in the
KB layer, rather than behind a protocol in the runtime: the runtime already stops and starts at any
step and restarts a multistep sampler with a fresh plan, so nothing in it has to know that a KB
exists, and the lookup, the blend and the per-image jump decisions stay in one module.

Latent mode (ReDi): run steps [0, key step), look up each image's latent, and per image either jump
(set the latent of value step v to the blend of its neighbours' values and continue from v with a
fresh plan, which rebuilds DPM-Solver++'s history from there) or continue where it is with the
original plan (its sampler state restricted to those images). Prompt mode looks up the prompt's
text embedding instead and jumps before the first step. A batch whose images get different jumps is
continued as one group per start step; images come back in their original order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from effdiff.errors import EffdiffError
from effdiff.kb.adaptive import DEFAULT_MAX_VALUE_ERROR, DEFAULT_PROMPT_GATE, JumpPolicy
from effdiff.kb.build import prompt_keys
from effdiff.kb.store import KnowledgeBase
from effdiff.runtime.graphs import Usage
from effdiff.runtime.images import to_pil
from effdiff.runtime.pipeline import Conditioning, GenerationResult, Hooks, Pipeline
from effdiff.runtime.propagation import AUTO, KeySchedule, NoiseInjection

MODES = ("latent", "prompt")
COMBINES = ("lstsq", "nearest")


@dataclass(frozen=True)
class Jump:
    """What the KB did for one image."""

    start_step: int | None  # the value step it continued from; None: generated in full
    distance: float  # exact L2 to its nearest entry (key-step latents, or prompt embeddings)
    neighbours: tuple[int, ...]  # entry ids, nearest first
    unet_steps: int  # denoising steps it ran
    prompt_gated: bool = False  # generated in full because its prompt is far from every stored one

    def describe(self, key_step: int) -> str:
        if self.start_step is None:
            return "full (prompt far from the KB)" if self.prompt_gated else "full"
        return f"{key_step}->{self.start_step}"


@dataclass
class RetrievalResult(GenerationResult):
    jumps: list[Jump] = field(default_factory=list)
    steps: int = 0
    mode: str = "latent"
    lookup_s: float = 0.0  # search + blend, all images
    propagation: str = "none"  # this run's schedule
    kb_propagation: str = "none"  # the schedule of the KB's trajectories

    @property
    def unet_steps(self) -> int:
        return sum(j.unet_steps for j in self.jumps)

    @property
    def saved(self) -> float:
        """Share of denoising steps (UNet evaluations) skipped, over the batch."""
        return 1.0 - self.unet_steps / max(1, self.steps * len(self.jumps))

    def summary(self, key_step: int) -> str:
        """'kb (latent): jumps 10->30, full; UNet steps 60 of 100 (saved 40 %)', and when the KB's
        trajectories ran on another schedule than this run, '; KB built with propagation none, this run
        cache:3' (its key-step latents then lie farther from the keys: fewer jumps)."""
        key = key_step if self.mode == "latent" else 0
        jumps = ", ".join(j.describe(key) for j in self.jumps)
        full = self.steps * len(self.jumps)
        saved = f"saved {100 * self.saved:.0f} %"
        line = f"kb ({self.mode}): jumps {jumps}; UNet steps {self.unet_steps} of {full} ({saved})"
        if self.kb_propagation != self.propagation:
            line += f"; KB built with propagation {self.kb_propagation}, this run {self.propagation}"
        return line


def _select(cond: Conditioning, rows: np.ndarray) -> Conditioning:
    """The conditioning of some images of a batch: rows [negative x B, prompt x B] stay paired."""
    emb, b = cond.embeddings, cond.batch
    emb = np.concatenate([emb[:b][rows], emb[b:][rows]]) if cond.guided else emb[rows]
    return Conditioning(emb, len(rows), cond.guidance_scale)


class RetrievalStart:
    """`RetrievalStart(pipe, kb)(prompts, seed=...)`: a pipeline call that starts from the KB.

    `policy`: how far each image may jump (default: the KB's adaptive thresholds for the mode);
    `JumpPolicy.fixed(v)` always jumps to v, as ReDi does; the default stops at the last value step
    whose leave-one-out value error for `combine` is within `DEFAULT_MAX_VALUE_ERROR`. `combine`:
    ReDi's least-squares blend of the `neighbours` nearest entries, or the nearest entry's value alone.
    """

    def __init__(
        self,
        pipe: Pipeline,
        kb: KnowledgeBase,
        mode: str = "latent",
        combine: str = "lstsq",
        neighbours: int = 4,
        policy: JumpPolicy | None = None,
    ) -> None:
        if mode not in MODES:
            raise EffdiffError(f"retrieval mode must be one of {', '.join(MODES)}, got {mode!r}")
        if combine not in COMBINES:
            raise EffdiffError(f"combine must be one of {', '.join(COMBINES)}, got {combine!r}")
        if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 1:
            raise EffdiffError(f"neighbours must be an integer >= 1, got {neighbours!r}")
        kb.check_compatible(pipe.manifest)
        if policy is not None and not set(policy.value_steps) <= set(kb.value_steps):
            raise EffdiffError(
                f"jump to step(s) {sorted(set(policy.value_steps) - set(kb.value_steps))}: this KB holds "
                f"values at steps {', '.join(map(str, kb.value_steps))} only"
            )
        self.pipe, self.kb, self.mode, self.combine = pipe, kb, mode, combine
        self.neighbours = neighbours
        self.policy = policy or kb.policy(mode, combine=combine)

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | None = None,
        seed: int | None = 0,
        latents: np.ndarray | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images: int = 1,
        steps: int | None = None,
        sampler: str | None = None,
        guidance_scale: float | None = None,
        propagation: KeySchedule | str = "none",
        max_decoder_batch: int | None = None,
        noise_injection: NoiseInjection | str | None = AUTO,
        vae_tile: int | None = None,
        hooks: Hooks | None = None,
        progress: bool = False,
        measure_memory: bool = False,
        key_latents: np.ndarray | None = None,
    ) -> RetrievalResult:
        """Generate as `Pipeline.__call__` does; steps, sampler and guidance are the KB's (a different
        value is refused). `latents` are unit noise (B, C, h, w); else `seed` draws them.
        `key_latents`: the latents after the key step of a run with the same noise, prompts and
        propagation, when the caller has them (evaluation compares with full runs that pass through the
        key step anyway); those steps are still counted as run. With a multistep sampler the images
        that do not jump then restart its history at the key step."""
        pipe, kb, s = self.pipe, self.kb, self.kb.settings
        kb.check_compatible(pipe.manifest, sampler, steps, guidance_scale)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negative = s.negative_prompt if negative_prompt is None else negative_prompt
        dh, dw = pipe.default_size()
        height, width = height or dh, width or dw
        plan_args = (s.steps, s.sampler, propagation, max_decoder_batch, noise_injection)
        plan = pipe.plan(*plan_args)
        batch = len(prompts) * num_images
        unit = pipe.initial_noise(batch, height, width, seed, latents)
        kb.check_compatible(pipe.manifest, latent_shape=unit.shape[1:])
        usage = Usage()
        monitor: Any = contextlib.nullcontext()
        if measure_memory:
            from effdiff.profiling import PeakRSS

            monitor = PeakRSS()
        with monitor:
            t0 = time.perf_counter()
            cond = pipe.encode_prompt(prompts, negative, num_images, s.guidance, hooks, usage)
            x = unit * np.float32(plan.scheduler.init_noise_sigma)
            common = dict(hooks=hooks, usage=usage, progress=progress)
            if self.mode == "latent":
                here = s.key_step
                if key_latents is None:
                    x = pipe.denoise(x, cond, plan, stop_step=here, injection_noise=unit, **common)
                else:
                    if key_latents.shape != x.shape:
                        raise EffdiffError(f"key_latents must have shape {x.shape}, got {key_latents.shape}")
                    x = np.asarray(key_latents, x.dtype)
                queries = x.reshape(batch, -1)
                space = "latent"
            else:
                here, queries, space = 0, prompt_keys(cond), "prompt"
            t_look = time.perf_counter()
            found = kb.search(queries, self.neighbours, space)
            prompt_d = np.zeros(batch, np.float32)
            if space == "latent" and np.isfinite(self.policy.prompt_limit):
                prompt_d = kb.search(prompt_keys(cond), 1, "prompt").distances[:, 0]
            pairs = zip(found.distances[:, 0], prompt_d, strict=True)
            starts = [self.policy.choose(float(d), float(pd)) for d, pd in pairs]
            start_of = [here if v is None else v for v in starts]
            blended = {
                r: kb.blend(queries[r], found.ids[r], v, self.combine, space)
                for r, v in enumerate(starts)
                if v is not None
            }
            lookup_s = time.perf_counter() - t_look
            final = np.empty_like(x)
            for step in sorted(set(start_of)):
                rows = np.array([r for r in range(batch) if start_of[r] == step])
                jumped = starts[rows[0]] is not None
                if jumped:
                    sub_plan = pipe.plan(*plan_args)  # a fresh sampler state from the value step
                    xs = np.stack([blended[r] for r in rows]).reshape((len(rows), *x.shape[1:]))
                    xs = xs.astype(x.dtype)
                else:  # continue where it is: the original plan, its state kept for these images only
                    sub_plan = dataclasses.replace(plan, scheduler=plan.scheduler.select_rows(rows))
                    xs = x[rows]
                sub = _select(cond, rows)
                final[rows] = pipe.denoise(
                    xs, sub, sub_plan, start_step=step, injection_noise=unit[rows], **common
                )
            images = pipe.decode(final, vae_tile, hooks, usage)
            total = time.perf_counter() - t0
        timings = {k: round(v, 6) for k, v in usage.seconds.items()}
        timings["kb_lookup"] = lookup_s
        timings["overhead"] = max(0.0, total - usage.load_seconds - sum(usage.seconds.values()) - lookup_s)
        timings["total"] = total
        timings["load"] = usage.load_seconds
        jumps = [
            Jump(
                starts[r],
                float(found.distances[r, 0]),
                tuple(int(i) for i in found.ids[r] if i >= 0),
                s.steps - (start_of[r] - here) if starts[r] is not None else s.steps,
                bool(prompt_d[r] > self.policy.prompt_limit),
            )
            for r in range(batch)
        ]
        return RetrievalResult(
            to_pil(images),
            final,
            timings,
            dict(usage.calls),
            plan.schedule.run_keys(plan.steps),
            monitor.peak_gib if measure_memory else None,
            info={"policy": self.policy.label, "combine": self.combine},
            jumps=jumps,
            steps=s.steps,
            mode=self.mode,
            lookup_s=lookup_s,
            propagation=str(plan.schedule),
            kb_propagation=str(s.schedule),
        )


def as_int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise EffdiffError(f"expected integers separated by commas, got {text!r}") from None


def as_float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise EffdiffError(f"expected numbers separated by commas, got {text!r}") from None


def _number_or_off(
    text: str | None, default: float | None, low: float, high: float, rule: str
) -> float | None:
    """CLI text: `off` (None), a number within [low, high], or None for `default`; else `rule` in an error."""
    if text is None:
        return default
    if text.strip().lower() == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not low <= value <= high:
        raise EffdiffError(f"{rule} or 'off', got {text!r}")
    return value


def as_prompt_gate(text: str | None) -> float | None:
    """`off` or a quantile within [0, 1] (CLI text for the prompt gate); None: the default."""
    return _number_or_off(text, DEFAULT_PROMPT_GATE, 0.0, 1.0, "the prompt gate is a quantile within [0, 1]")


def as_max_error(text: str | None) -> float | None:
    """`off` or a relative value error within (0, 10] (CLI text for the jump cap); None: the default."""
    rule = "the largest value error is a relative L2 error within (0, 10]"
    return _number_or_off(text, DEFAULT_MAX_VALUE_ERROR, 1e-9, 10.0, rule)


def jump_policy(
    kb: KnowledgeBase,
    jump: str,
    mode: str = "latent",
    prompt_gate: float | None = DEFAULT_PROMPT_GATE,
    max_error: float | None = DEFAULT_MAX_VALUE_ERROR,
    combine: str = "lstsq",
) -> JumpPolicy:
    """`adaptive` (the KB's thresholds), `adaptive:Q1,Q2,...` (other quantiles per value step),
    a value step number (always jump there, as ReDi does: no prompt gate, no cap), or `none` (never
    jump). Adaptive latent jumps pass the prompt gate at quantile `prompt_gate` (None: no gate) and
    stop at the last value step whose leave-one-out value error for `combine` is within `max_error`
    (None: no cap)."""
    if jump == "adaptive":
        return kb.policy(mode, None, prompt_gate, max_error, combine)
    if jump.startswith("adaptive:"):
        return kb.policy(mode, as_float_list(jump.split(":", 1)[1]), prompt_gate, max_error, combine)
    if jump == "none":
        return JumpPolicy(kb.value_steps, tuple(-1.0 for _ in kb.value_steps), "none")
    try:
        step = int(jump)
    except ValueError:
        raise EffdiffError(
            f"jump must be adaptive, adaptive:Q1,Q2,..., none or a value step, got {jump!r}"
        ) from None
    if step not in kb.value_steps:
        raise EffdiffError(f"this KB holds values at steps {', '.join(map(str, kb.value_steps))}, not {step}")
    return JumpPolicy.fixed(step)


def describe_policy(policy: JumpPolicy) -> dict[str, Any]:
    return policy.to_json()
