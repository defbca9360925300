"""Fidelity to a reference output: PSNR and SSIM of images, relative L2 of latents."""

from __future__ import annotations

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB; inf for identical inputs."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak**2 / mse)


def relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b||."""
    b64 = np.asarray(b, np.float64)
    return float(np.linalg.norm(np.asarray(a, np.float64) - b64) / max(np.linalg.norm(b64), 1e-12))
