"""The reference model's judge: prompt adherence read by the attribute classifier (an ONNX CNN with one
head per scene attribute), with Wilson confidence intervals, and a domain Frechet distance on its
features (the FID formula on the classifier's 64-d features instead of Inception's)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from effdiff._deps import require
from effdiff.errors import EffdiffError
from effdiff.reference import CLASSIFIER
from effdiff.reference.dataset import ATTRIBUTES, IMAGE_SIZE, Scene


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (sound near 0 and 1, unlike the normal one)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference_interval(
    a: np.ndarray, b: np.ndarray, z: float = 1.959964
) -> tuple[float, float, float]:
    """Difference of two proportions measured on the same items (a[i], b[i]: item i right under each
    condition) and its 95 % interval: Newcombe's hybrid score interval for paired data (Statistics in
    Medicine 17:2635-2650, 1998, method 10), Wilson intervals of both sides corrected for their correlation.
    Two configurations scored on the same prompts and noise disagree on few images, so this is far
    narrower than comparing their two Wilson intervals. Written here because no installed library
    has it (statsmodels and scipy are not dependencies)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape or a.ndim != 1:
        raise EffdiffError(f"paired readings need two equal 1-d arrays, got {a.shape} and {b.shape}")
    n = len(a)
    both, only_a = int(np.sum(a & b)), int(np.sum(a & ~b))
    only_b, neither = int(np.sum(~a & b)), int(np.sum(~a & ~b))
    pa, pb = (both + only_a) / max(n, 1), (both + only_b) / max(n, 1)
    la, ua = wilson_interval(both + only_a, n, z)
    lb, ub = wilson_interval(both + only_b, n, z)
    denom = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    # the correlation of the two readings, with Newcombe's continuity correction of a positive one
    cross = both * neither - only_a * only_b
    cross = max(cross - n / 2, 0.0) if cross > 0 else cross
    phi = cross / math.sqrt(denom) if denom > 0 else 0.0
    delta = math.sqrt(max(0.0, (pa - la) ** 2 - 2 * phi * (pa - la) * (ub - pb) + (ub - pb) ** 2))
    eps = math.sqrt(max(0.0, (ua - pa) ** 2 - 2 * phi * (ua - pa) * (pb - lb) + (pb - lb) ** 2))
    diff = pa - pb
    return diff, max(-1.0, diff - delta), min(1.0, diff + eps)


def misread(
    preds: dict[str, np.ndarray], scenes: list[Scene], attribute: str, by: str | None = None
) -> Counter[tuple[str, ...]]:
    """(prompted, read) value pairs of one attribute where the classifier read another value than the
    prompt's: the confusions behind an adherence figure (`most_common()` lists the worst first). With
    `by`, each pair also carries the scene's value of that attribute: (prompted, read, e.g. background)."""
    values = ATTRIBUTES[attribute]
    return Counter(
        (getattr(s, attribute), values[p], *((getattr(s, by),) if by else ()))
        for s, p in zip(scenes, preds[attribute], strict=True)
        if values[p] != getattr(s, attribute)
    )


@dataclass
class Adherence:
    """Fraction of images whose classifier reading matches the prompt, per attribute; `correct` keeps
    the per-image readings, so two configurations on the same prompts can be compared pair by pair."""

    per_attribute: dict[str, float]
    count: int
    correct: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.per_attribute.values())))

    def interval(self, attribute: str) -> tuple[float, float]:
        """95 % Wilson interval of one attribute's adherence over `count` images."""
        return wilson_interval(round(self.per_attribute[attribute] * self.count), self.count)

    def pooled_interval(self) -> tuple[float, float]:
        """95 % Wilson interval of the mean over all attribute readings (count x attributes)."""
        n = self.count * len(self.per_attribute)
        return wilson_interval(round(self.mean * n), n)

    def describe(self, attribute: str) -> str:
        lo, hi = self.interval(attribute)
        return f"{self.per_attribute[attribute]:.3f} [{lo:.3f}, {hi:.3f}]"

    def versus(self, baseline: Adherence, attribute: str) -> str:
        """This adherence minus `baseline`'s on the same images, with its paired 95 % interval."""
        diff, lo, hi = paired_difference_interval(self.correct[attribute], baseline.correct[attribute])
        return f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}]"

    @classmethod
    def of(cls, preds: dict[str, np.ndarray], scenes: list[Scene]) -> Adherence:
        """Score `AttributeClassifier.run` predictions against the scenes the prompts described."""
        truth = [s.labels() for s in scenes]
        correct = {
            name: np.array([p == t[name] for p, t in zip(preds[name], truth, strict=True)], bool)
            for name in ATTRIBUTES
        }
        return cls({n: float(np.mean(c)) for n, c in correct.items()}, len(scenes), correct)


class AttributeClassifier:
    """The classifier in an onnxruntime CPU session (it is small; its verdicts must not vary by device)."""

    def __init__(self, path: Path = CLASSIFIER) -> None:
        ort = require("onnxruntime")
        if not Path(path).exists():
            raise EffdiffError(f"attribute classifier {path} is missing; run scripts/train_classifier.py")
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(self, images: list[Image.Image]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Predicted attribute indices per image, and 64-d features."""
        arr = np.stack(
            [np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)), np.float32) for im in images]
        )
        x = (arr.transpose(0, 3, 1, 2) / 127.5 - 1.0).astype(np.float32)
        logits, feats = self.session.run(None, {"image": x})
        preds, offset = {}, 0
        for name, values in ATTRIBUTES.items():
            preds[name] = logits[:, offset : offset + len(values)].argmax(1)
            offset += len(values)
        return preds, feats

    def adherence(self, images: list[Image.Image], scenes: list[Scene]) -> Adherence:
        return Adherence.of(self.run(images)[0], scenes)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(Sa + Sb - 2 (Sa Sb)^1/2), the FID formula, via symmetric eigendecompositions."""
    feats_a, feats_b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    sa, sb = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    sqrt_sa = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(sqrt_sa @ sb @ sqrt_sa)  # same eigenvalues as Sa Sb
    tr_sqrt = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * tr_sqrt)
