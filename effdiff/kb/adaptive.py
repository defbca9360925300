"""How far a query may jump: the nearer its neighbours, the later the step it starts from.

The thresholds come from the knowledge base itself. At build time a held-back sample of entries is
looked up in the KB with every entry of its own prompt left out (as a new prompt would be), and the
distance to the nearest remaining entry is recorded. Value step v_j (ascending) is allowed when the
query's distance is at most the q_j-quantile of those distances, with q_j falling as the jump grows:
long jumps only for queries as close as the KB's own closest pairs. A query farther than the
shortest jump's threshold (a prompt or starting noise unlike anything stored) gets no jump and is
generated in full.

A latent can be near a stored one while its prompt is not: on the reference model, prompts of
(kind, colour) pairs the KB never saw land at step 10 beside entries of another colour, and jumping
there costs colour. So latent-mode jumps also pass a prompt gate: the prompt's text embedding must be
no farther from the nearest stored prompt than the `prompt_gate` quantile of the KB's own
leave-one-prompt-out prompt distances (by default the same 0.95 as the shortest jump's).

Distance alone cannot tell how wrong a long jump is: the farther the value step, the more a
neighbour's trajectory has become its own image. The build records each value step's leave-one-out
value error (a held-back entry's own value against the blend of its neighbours'), and adaptive jumps
stop at the last value step whose error is within `max_error` (`DEFAULT_MAX_VALUE_ERROR`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from effdiff.errors import EffdiffError

# q for the shortest jump .. q for the longest, spaced linearly over the value steps.
DEFAULT_QUANTILES = (0.95, 0.6)
DEFAULT_PROMPT_GATE = 0.95
# The largest leave-one-out value error (relative L2) an adaptive jump may carry. On the reference
# model v1.3 (cache:3 KB of 408 prompts, benchmarks/kb_reference.py validation on 128 held-back
# entries), jumps to step 30 (error 0.19) kept shape at 0.992 and colour at 0.992 against the entries'
# own 1.000 / 0.977, while step 35 (0.25) dropped shape to 0.953 and step 40 (0.31) to 0.922. v1.0's
# errors (0.003 to 0.018) are far below the cap.
DEFAULT_MAX_VALUE_ERROR = 0.2


def default_quantiles(count: int, span: tuple[float, float] = DEFAULT_QUANTILES) -> tuple[float, ...]:
    if count == 1:
        return (span[0],)
    return tuple(float(q) for q in np.linspace(span[0], span[1], count))


def prompt_limit(prompt_distances: np.ndarray, quantile: float) -> float:
    """The prompt gate: `quantile` of the KB's leave-one-out prompt distances (-1: nothing to
    calibrate on, so every prompt is beyond it)."""
    if not 0.0 <= quantile <= 1.0:
        raise EffdiffError(f"the prompt gate is a quantile within [0, 1], got {quantile:g}")
    finite = np.asarray(prompt_distances, np.float64)
    finite = finite[np.isfinite(finite)]
    return float(np.quantile(finite, quantile)) if len(finite) else -1.0


@dataclass(frozen=True)
class JumpPolicy:
    """Per value step (ascending), the largest distance that still allows jumping to it."""

    value_steps: tuple[int, ...]
    thresholds: tuple[float, ...]
    label: str = "adaptive"
    prompt_limit: float = math.inf  # no jump when the prompt is farther than this from every stored one

    def __post_init__(self) -> None:
        if len(self.value_steps) != len(self.thresholds) or not self.value_steps:
            raise EffdiffError("a jump policy needs one threshold per value step")

    @classmethod
    def from_distances(
        cls, distances: np.ndarray, value_steps: tuple[int, ...], quantiles: tuple[float, ...]
    ) -> JumpPolicy:
        if len(quantiles) != len(value_steps):
            raise EffdiffError(
                f"{len(quantiles)} jump quantiles given for {len(value_steps)} value steps "
                f"({', '.join(map(str, value_steps))}); give one per value step"
            )
        if any(not 0.0 <= q <= 1.0 for q in quantiles):
            raise EffdiffError(f"jump quantiles must be within [0, 1], got {quantiles}")
        finite = np.asarray(distances, np.float64)
        finite = finite[np.isfinite(finite)]
        if len(finite) == 0:  # no entry had a neighbour of another prompt: nothing to calibrate on
            never = tuple(-1.0 for _ in value_steps)
            return cls(tuple(value_steps), never, "adaptive (no calibration: never jumps)")
        raw = np.quantile(finite, quantiles)
        # never allow a longer jump at a larger distance than a shorter one
        thresholds = np.minimum.accumulate(raw)
        label = "adaptive q=" + ",".join(f"{q:g}" for q in quantiles)
        return cls(tuple(value_steps), tuple(float(t) for t in thresholds), label)

    @classmethod
    def fixed(cls, value_step: int) -> JumpPolicy:
        """Always jump to one value step, whatever the distance (ReDi's rule)."""
        return cls((value_step,), (float("inf"),), f"fixed {value_step}")

    def gated(self, prompt_distances: np.ndarray, quantile: float | None) -> JumpPolicy:
        """This policy with a prompt gate at `quantile` of the KB's leave-one-out prompt distances
        (None: no gate)."""
        if quantile is None:
            return dataclasses.replace(self, prompt_limit=math.inf)
        limit = prompt_limit(prompt_distances, quantile)
        return dataclasses.replace(
            self, prompt_limit=limit, label=f"{self.label}, prompt gate q={quantile:g}"
        )

    def capped(self, max_step: int | None, reason: str = "") -> JumpPolicy:
        """This policy without the value steps after `max_step` (None: unchanged)."""
        if max_step is None or max_step >= max(self.value_steps):
            return self
        thresholds = tuple(
            t if v <= max_step else -1.0 for v, t in zip(self.value_steps, self.thresholds, strict=True)
        )
        cap = f"jumps to step {max_step} at most" if max_step >= min(self.value_steps) else "never jumps"
        return dataclasses.replace(
            self, thresholds=thresholds, label=f"{self.label}, {cap}{f' ({reason})' if reason else ''}"
        )

    def choose(self, distance: float, prompt_distance: float = 0.0) -> int | None:
        """The latest value step whose threshold admits `distance`; None: no jump (also when the
        prompt is beyond the prompt gate)."""
        if prompt_distance > self.prompt_limit:
            return None
        best = None
        for step, limit in zip(self.value_steps, self.thresholds, strict=True):
            if distance <= limit:
                best = step
        return best

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "label": self.label,
            "thresholds": dict(zip(map(str, self.value_steps), self.thresholds, strict=True)),
        }
        if math.isfinite(self.prompt_limit):
            out["prompt_limit"] = self.prompt_limit
        return out


def longest_jump(
    value_errors: dict[str, dict[str, float]],
    value_steps: tuple[int, ...],
    combine: str = "lstsq",
    max_error: float | None = DEFAULT_MAX_VALUE_ERROR,
) -> int | None:
    """The last value step before the first whose recorded leave-one-out value error (for `combine`)
    exceeds `max_error`, or has none recorded (a step no error vouches for is not jumped to); None: no
    cap (`max_error` None, or no errors recorded at all); a step below every value step when even the
    first is too far."""
    if max_error is not None and not max_error > 0:
        raise EffdiffError(f"the largest value error must be > 0, got {max_error:g}")
    if max_error is None or not value_errors:
        return None
    last = min(value_steps) - 1
    for step in sorted(value_steps):
        error = value_errors.get(str(step), {}).get(combine)
        if error is None or error > max_error:
            break
        last = step
    return None if last == max(value_steps) else last
