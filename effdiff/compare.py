"""Torch-free comparison of outputs: relative L2, max abs diff, PSNR, returned as data, not True/False.

Export validation (ONNX vs PyTorch), INT8 validation (INT8 vs fp32), engine and CoreML checks and the
benchmarks all compare through here, so one formula serves every figure in a manifest or report.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from effdiff.errors import EffdiffError


def relative_l2(got: np.ndarray, want: np.ndarray) -> float:
    """||got - want|| / ||want|| in float64 (want's norm floored at 1e-12)."""
    w = np.asarray(want, np.float64)
    return float(np.linalg.norm(np.asarray(got, np.float64) - w) / max(np.linalg.norm(w), 1e-12))


def max_abs(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max())


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB; inf for identical inputs."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak**2 / mse)


@dataclass(frozen=True)
class Comparison:
    """One output of one case: `got` (ONNX, INT8, engine ...) against `want` (the reference)."""

    graph: str
    case: str
    output: str
    max_abs: float
    rel_l2: float
    tolerance: float  # on rel_l2

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.rel_l2)) and self.rel_l2 <= self.tolerance

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Comparison:
        return cls(**{k: data[k] for k in ("graph", "case", "output", "max_abs", "rel_l2", "tolerance")})


def compare_outputs(
    graph: str,
    case: str,
    got: Mapping[str, np.ndarray],
    want: Mapping[str, np.ndarray],
    tolerance: float,
) -> list[Comparison]:
    """One Comparison per output in `want`; EffdiffError when a shape differs (that is a bug, not drift)."""
    out = []
    for name, ref in want.items():
        value = np.asarray(got[name])
        if value.shape != ref.shape:
            raise EffdiffError(f"{graph} output {name} has shape {value.shape}, the reference {ref.shape}")
        out.append(Comparison(graph, case, name, max_abs(value, ref), relative_l2(value, ref), tolerance))
    return out


def worst_table(comparisons: list[Comparison]) -> list[str]:
    """Worst case per (graph, output), as the lines of a fixed-width table."""
    lines = [
        f"{'graph':<22} {'output':<18} {'cases':>5} {'max abs diff':>13} {'rel L2':>10} {'tol':>8}  ok",
        "-" * 86,
    ]
    groups: dict[tuple[str, str], list[Comparison]] = {}
    for c in comparisons:
        groups.setdefault((c.graph, c.output), []).append(c)
    for (graph, output), comps in groups.items():
        worst = max(comps, key=lambda c: c.rel_l2 if np.isfinite(c.rel_l2) else np.inf)
        mark = "yes" if all(c.passed for c in comps) else "NO"
        lines.append(
            f"{graph:<22} {output:<18} {len(comps):>5} {max(c.max_abs for c in comps):>13.3e} "
            f"{worst.rel_l2:>10.3e} {worst.tolerance:>8.0e}  {mark}"
        )
    return lines
