"""Quality figures, torch-free: fidelity to a reference output (PSNR, SSIM, relative L2), prompt
adherence scored by the reference attribute classifier, and a domain Frechet distance on its features."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from effdiff.bench.shapes import ATTRIBUTES, IMAGE_SIZE, Scene
from effdiff.errors import EffdiffError

CLASSIFIER = Path(__file__).resolve().parent.parent / "reference" / "classifier.onnx"


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB; inf for identical inputs."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak**2 / mse)


def relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b||."""
    b64 = np.asarray(b, np.float64)
    return float(np.linalg.norm(np.asarray(a, np.float64) - b64) / max(np.linalg.norm(b64), 1e-12))


def _gaussian_filter(x: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Separable Gaussian blur over the first two axes ('valid' region), for SSIM."""
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    x = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 0, x)
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 1, x)


def ssim(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Structural similarity (Wang et al. 2004; Gaussian window 11, sigma 1.5), mean over channels."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a64.shape != b64.shape:
        raise ValueError(f"ssim needs equal shapes, got {a64.shape} and {b64.shape}")
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mu_a, mu_b = _gaussian_filter(a64), _gaussian_filter(b64)
    var_a = _gaussian_filter(a64 * a64) - mu_a**2
    var_b = _gaussian_filter(b64 * b64) - mu_b**2
    cov = _gaussian_filter(a64 * b64) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(Sa + Sb - 2 (Sa Sb)^1/2), the FID formula, via symmetric eigendecompositions."""
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    sa, sb = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    sqrt_sa = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(sqrt_sa @ sb @ sqrt_sa)  # same eigenvalues as Sa Sb
    tr_sqrt = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * tr_sqrt)


@dataclass
class Adherence:
    """Fraction of images whose classifier reading matches the prompt, per attribute."""

    per_attribute: dict[str, float]
    count: int

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.per_attribute.values())))

    @classmethod
    def of(cls, preds: dict[str, np.ndarray], scenes: list[Scene]) -> Adherence:
        """Score `AttributeClassifier.run` predictions against the scenes the prompts described."""
        truth = [s.labels() for s in scenes]
        per = {
            name: float(np.mean([p == t[name] for p, t in zip(preds[name], truth, strict=True)]))
            for name in ATTRIBUTES
        }
        return cls(per, len(scenes))


class AttributeClassifier:
    """The reference model's judge: an ONNX CNN with one head per scene attribute and a feature output."""

    def __init__(self, path: Path = CLASSIFIER) -> None:
        import onnxruntime as ort

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
