"""The UNet split by composition, for the export: the skip-tensor layout (geometry) of a model, and the
split modules themselves, which live in the runtime layer (`effdiff.runtime.backends.torch_modules`)
so that the `torch` backend runs exactly the modules the export traces.
"""

from __future__ import annotations

from typing import Any

from effdiff.runtime.backends.torch_modules import (
    SPLIT_MODULES,
    CachePoint,
    TextEncoder,
    UNetDecoder,
    UNetDeep,
    UNetEncoder,
    UNetShallow,
    VAEDecoder,
    WholeUNet,
    cache_point,
    repeat_rows,
    split_module,
    time_embedding,
)
from effdiff.specs import Geometry

__all__ = [
    "SPLIT_MODULES",
    "CachePoint",
    "TextEncoder",
    "UNetDecoder",
    "UNetDeep",
    "UNetEncoder",
    "UNetShallow",
    "VAEDecoder",
    "WholeUNet",
    "cache_point",
    "geometry_from_configs",
    "repeat_rows",
    "split_module",
    "time_embedding",
]


def geometry_from_configs(
    unet_cfg: dict[str, Any], vae_cfg: dict[str, Any], text_cfg: dict[str, Any], cache_branch: int = 0
) -> Geometry:
    """Skip-tensor layout as diffusers' down blocks produce it: conv_in, then per block its resnets
    and (except the last block) its downsampler; and the deep feature of DeepCache's `cache_branch`."""
    channels = list(unet_cfg["block_out_channels"])
    n = len(channels)
    per_block = unet_cfg.get("layers_per_block", 2)
    per_block = [per_block] * n if isinstance(per_block, int) else list(per_block)
    skips = [(channels[0], 0)]
    level = 0
    for i, ch in enumerate(channels):
        skips += [(ch, level)] * per_block[i]
        if i < n - 1:
            level += 1
            skips.append((ch, level))
    point = cache_point(unet_cfg, cache_branch)
    # The mirrored up block outputs channels[c]; what enters it comes from the block inside it.
    inner = channels[min(point.block + 1, n - 1)]
    deep_channels = channels[point.block] if point.first_up_layer > 0 else inner
    return Geometry(
        latent_channels=int(unet_cfg.get("in_channels", 4)),
        unet_factor=2 ** (n - 1),
        vae_factor=2 ** (len(vae_cfg.get("block_out_channels", (1,))) - 1),
        text_len=int(text_cfg.get("max_position_embeddings", 77)),
        text_hidden=int(unet_cfg.get("cross_attention_dim", text_cfg.get("hidden_size", 768))),
        skips=tuple(skips),
        mid_channels=channels[-1],
        mid_level=level,
        cache_branch=cache_branch,
        deep_channels=deep_channels,
        deep_level=point.block,
    )
