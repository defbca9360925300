"""UNet layouts of the reference model, as `diffusers.UNet2DConditionModel` keyword arguments.

`v1` is the shipped model's: three resolution levels (16, 8, 4 at 16x16 latents), one layer per block.

`v2` is SD's layout at small width: four levels down to 2x2, cross-attention on the first three, two
layers per block; widths chosen so the whole model stays under 40 MB and the encoder's share of the
FLOPs matches SD1.5's. Trained with `--snr-floor 1 --layout-share 0.5` it follows position, which v1
never learned (a loss that ignored the noisiest steps, not the layout: benchmarks/reference_position.py).
benchmarks/reference_architecture.py measures each layout's encoder share (FLOPs and ONNX Runtime
time) and size.
"""

from __future__ import annotations

from typing import Any

from effdiff.errors import EffdiffError

_COMMON: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "cross_attention_dim": 128,
    "attention_head_dim": 4,
    "norm_num_groups": 32,
}
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "v1": {
        **_COMMON,
        "block_out_channels": (64, 128, 128),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    },
    "v2": {
        **_COMMON,
        "block_out_channels": (64, 96, 96, 96),
        "layers_per_block": 2,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    },
}


def unet_kwargs(architecture: str, sample_size: int) -> dict[str, Any]:
    """Keyword arguments of the reference UNet of that layout at `sample_size` latents."""
    if architecture not in ARCHITECTURES:
        raise EffdiffError(
            f"unknown reference architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}"
        )
    return {**ARCHITECTURES[architecture], "sample_size": sample_size}
