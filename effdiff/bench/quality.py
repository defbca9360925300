"""Image fidelity against a reference image, torch-free: SSIM here, PSNR in `effdiff.compare`.
Prompt adherence of the reference model lives with its judge, `effdiff.reference.judge`."""

from __future__ import annotations

import numpy as np


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
