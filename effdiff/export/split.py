"""The UNet split by composition: modules that hold the diffusers submodules, no copied forward, no state.

ENCODER: conv_in, time embedding, down blocks, mid block -> (mid, skip_00 .. skip_NN)
DECODER: time embedding, up blocks, conv_norm_out/conv_act/conv_out -> noise prediction

The decoder embeds its own timesteps, so one decoder batch may carry a different timestep per row
(the runtime batches the decoder calls of consecutive non-key steps this way).
"""

from __future__ import annotations

from typing import Any

from effdiff._deps import require
from effdiff.specs import Geometry

torch = require("torch")
nn = torch.nn


def geometry_from_configs(
    unet_cfg: dict[str, Any], vae_cfg: dict[str, Any], text_cfg: dict[str, Any]
) -> Geometry:
    """Skip-tensor layout as diffusers' down blocks produce it: conv_in, then per block its resnets
    and (except the last block) its downsampler."""
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
    return Geometry(
        latent_channels=int(unet_cfg.get("in_channels", 4)),
        unet_factor=2 ** (n - 1),
        vae_factor=2 ** (len(vae_cfg.get("block_out_channels", (1,))) - 1),
        text_len=int(text_cfg.get("max_position_embeddings", 77)),
        text_hidden=int(unet_cfg.get("cross_attention_dim", text_cfg.get("hidden_size", 768))),
        skips=tuple(skips),
        mid_channels=channels[-1],
        mid_level=level,
    )


def time_embedding(unet: Any, sample: Any, timestep: Any) -> Any:
    """diffusers' own timestep projection + MLP (+ act), one embedding per batch row."""
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, None)
    return unet.time_embed_act(emb) if unet.time_embed_act is not None else emb


def _has_cross_attention(block: Any) -> bool:
    return bool(getattr(block, "has_cross_attention", False))


class UNetEncoder(nn.Module):
    """(sample, timestep, encoder_hidden_states) -> (mid, *skips)."""

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: Any, timestep: Any, encoder_hidden_states: Any) -> tuple[Any, ...]:
        unet = self.unet
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = time_embedding(unet, sample, timestep)
        hidden = unet.conv_in(sample)
        skips: tuple[Any, ...] = (hidden,)
        for block in unet.down_blocks:
            if _has_cross_attention(block):
                hidden, res = block(
                    hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states
                )
            else:
                hidden, res = block(hidden_states=hidden, temb=emb)
            skips += res
        if _has_cross_attention(unet.mid_block):
            mid = unet.mid_block(hidden, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            mid = unet.mid_block(hidden, emb)
        return (mid, *skips)


def repeat_rows(x: Any, times: Any) -> Any:
    """(B, ...) -> (times * B, ...), step-major: row j * B + b is row b of step j."""
    return x.repeat(times, *([1] * (x.dim() - 1)))


class UNetDecoder(nn.Module):
    """(timestep (k*B,), encoder_hidden_states (B,..), mid (B,..), *skips (B,..)) -> noise (k*B, ...).

    One call may decode k steps that share one key step's features: `timestep` holds k*B rows and
    the features and text embeddings are repeated k times here, inside the graph, so no backend copies
    them k times on the host. Latent height/width must be multiples of the UNet factor, so up blocks
    need no explicit upsample_size.
    """

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, timestep: Any, encoder_hidden_states: Any, mid: Any, *skips: Any) -> Any:
        unet = self.unet
        steps = timestep.shape[0] // mid.shape[0]
        mid = repeat_rows(mid, steps)
        skips = tuple(repeat_rows(s, steps) for s in skips)
        encoder_hidden_states = repeat_rows(encoder_hidden_states, steps)
        emb = time_embedding(unet, mid, timestep)
        hidden = mid
        remaining = skips
        for block in unet.up_blocks:
            n = len(block.resnets)
            res, remaining = remaining[-n:], remaining[:-n]
            if _has_cross_attention(block):
                hidden = block(
                    hidden_states=hidden,
                    temb=emb,
                    res_hidden_states_tuple=res,
                    encoder_hidden_states=encoder_hidden_states,
                )
            else:
                hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res)
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)


class WholeUNet(nn.Module):
    """The unsplit diffusers UNet with per-row timesteps: the baseline graph."""

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: Any, timestep: Any, encoder_hidden_states: Any) -> Any:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class TextEncoder(nn.Module):
    """input_ids -> last_hidden_state, as StableDiffusionPipeline uses it (no attention mask)."""

    def __init__(self, text_encoder: Any) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: Any) -> Any:
        return self.text_encoder(input_ids, return_dict=False)[0]


class VAEDecoder(nn.Module):
    """Model-space latent -> image in [-1, 1]; the scaling factor is inside the graph."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: Any) -> Any:
        cfg = self.vae.config
        z = latent / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None):
            z = z + cfg.shift_factor
        return self.vae.decode(z, return_dict=False)[0]
