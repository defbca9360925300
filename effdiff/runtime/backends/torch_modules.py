"""The UNet split by composition, as PyTorch modules: they hold the diffusers submodules, copy no forward,
keep no state. The ONNX and CoreML exports trace them; the `torch` backend runs them.

ENCODER: conv_in, time embedding, down blocks, mid block -> (mid, skip_00 .. skip_NN)
DECODER: time embedding, up blocks, conv_norm_out/conv_act/conv_out -> noise prediction
DEEP / SHALLOW (DeepCache's recipe): the whole UNet that also returns the feature DeepCache caches,
and the shallow path that recomputes only the outer layers around that cached feature.

The decoder embeds its own timesteps, so one decoder batch may carry a different timestep per row
(the runtime batches the decoder calls of consecutive non-key steps this way).

Torch-only, and imported only lazily (by the `torch` backend and by `effdiff.export`): it lives in the
runtime layer so the runtime can build graphs from a source model without importing the export layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from effdiff._deps import require
from effdiff.errors import EffdiffError

torch = require("torch")
nn = torch.nn

# graph -> (the diffusers component it is cut from, its module class below)
SPLIT_MODULES: dict[str, tuple[str, str]] = {
    "text_encoder": ("text_encoder", "TextEncoder"),
    "unet_encoder": ("unet", "UNetEncoder"),
    "unet_decoder": ("unet", "UNetDecoder"),
    "unet": ("unet", "WholeUNet"),
    "unet_deep": ("unet", "UNetDeep"),
    "unet_shallow": ("unet", "UNetShallow"),
    "vae_decoder": ("vae", "VAEDecoder"),
}
CACHE_GRAPHS = ("unet_deep", "unet_shallow")  # their modules take DeepCache's branch


def load_pretrained(folder: Path, component: str, dtype: Any = None) -> Any:
    """One component of a diffusers pipeline folder, in eval mode without gradients, offline.
    `dtype` (a torch dtype) converts its weights; None keeps them as saved (fp32 for our exports)."""
    diffusers = require("diffusers")
    transformers = require("transformers")
    # diffusers converts at load (`torch_dtype`), as it recommends, rather than by a later `.to(dtype)`
    kw = {} if dtype is None else {"torch_dtype": dtype}
    loaders = {
        "unet": lambda p: diffusers.UNet2DConditionModel.from_pretrained(p, **kw),
        "vae": lambda p: diffusers.AutoencoderKL.from_pretrained(p, **kw),
        "text_encoder": lambda p: transformers.CLIPTextModel.from_pretrained(p, **kw),
        "tokenizer": lambda p: transformers.CLIPTokenizer.from_pretrained(p),
    }
    try:
        obj = loaders[component](Path(folder) / component)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EffdiffError(f"cannot load {component} from {folder}: {first}") from exc
    if hasattr(obj, "eval"):
        obj.eval().requires_grad_(False)
    return obj


@dataclass(frozen=True)
class CachePoint:
    """Where DeepCache's branch `b` cuts the UNet, in DeepCache's own numbering: block c = b // 3,
    layer l = b % 3, counted from the outside. At a cached step the down path runs conv_in, down blocks
    < c and layers < l of down block c; the up path runs the last l + 1 layers of the up block that
    mirrors block c (its upsampler too) and the up blocks after it. The deep feature is the hidden
    state entering that first shallow up layer."""

    branch: int
    block: int
    layer: int
    first_up_layer: int  # index, in forward order, of the first up layer the shallow path runs
    up_layers: int  # resnets in the mirrored up block


def cache_point(unet_cfg: dict[str, Any], branch: int) -> CachePoint:
    channels = list(unet_cfg["block_out_channels"])
    n = len(channels)
    per_block = unet_cfg.get("layers_per_block", 2)
    per_block = [per_block] * n if isinstance(per_block, int) else list(per_block)
    block, layer = divmod(branch, 3)
    up_layers = per_block[block] + 1 if block < n else 0  # diffusers' up blocks have one more resnet
    if branch < 0 or block >= n or layer >= up_layers:
        raise EffdiffError(
            f"cache branch {branch} does not exist in this UNet ({n} blocks of {per_block[0] + 1} up layers; "
            f"DeepCache numbers branch = 3 x block + layer)"
        )
    return CachePoint(branch, block, layer, up_layers - 1 - layer, up_layers)


def split_module(graph: str, component: Any, cache_branch: int = 0) -> Any:
    """The module of `graph` around its loaded diffusers component, in eval mode."""
    cls = globals()[SPLIT_MODULES[graph][1]]
    return (cls(component, cache_branch) if graph in CACHE_GRAPHS else cls(component)).eval()


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


# ---------------------------------------------------------------- DeepCache's recipe, on static graphs


def _down_layers(block: Any, hidden: Any, emb: Any, ehs: Any, layers: range) -> tuple[Any, tuple[Any, ...]]:
    """Layers `layers` of a down block, as its forward runs them: resnet, then attention when it has one."""
    cross = _has_cross_attention(block)
    states: tuple[Any, ...] = ()
    for j in layers:
        hidden = block.resnets[j](hidden, emb)
        if cross:
            hidden = block.attentions[j](hidden, encoder_hidden_states=ehs, return_dict=False)[0]
        states += (hidden,)
    return hidden, states


def _up_layers(block: Any, hidden: Any, emb: Any, ehs: Any, res: tuple[Any, ...], layers: range) -> Any:
    """Layers `layers` of an up block. `res` is the block's slice of skips in encoder order; layer j
    takes res[L - 1 - j], as the block's forward pops them from the end."""
    cross = _has_cross_attention(block)
    count = len(block.resnets)
    for j in layers:
        hidden = torch.cat([hidden, res[count - 1 - j]], dim=1)
        hidden = block.resnets[j](hidden, emb)
        if cross:
            hidden = block.attentions[j](hidden, encoder_hidden_states=ehs, return_dict=False)[0]
    return hidden


def _upsample(block: Any, hidden: Any) -> Any:
    for upsampler in block.upsamplers or ():
        hidden = upsampler(hidden)
    return hidden


def _up_block(block: Any, hidden: Any, emb: Any, ehs: Any, res: tuple[Any, ...]) -> Any:
    if _has_cross_attention(block):
        return block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=ehs)
    return block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res)


def _out(unet: Any, hidden: Any) -> Any:
    if unet.conv_norm_out is not None:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden)


class UNetDeep(nn.Module):
    """(sample, timestep, encoder_hidden_states) -> (noise prediction, deep feature): the whole UNet,
    run at DeepCache's full steps, also returning the feature the shallow path reuses."""

    def __init__(self, unet: Any, branch: int) -> None:
        super().__init__()
        self.unet = unet
        self.point = cache_point(dict(unet.config), branch)
        self.encoder = UNetEncoder(unet)

    def forward(self, sample: Any, timestep: Any, encoder_hidden_states: Any) -> tuple[Any, Any]:
        unet, point = self.unet, self.point
        mid, *skips = self.encoder(sample, timestep, encoder_hidden_states)
        emb = time_embedding(unet, mid, timestep)
        hidden, remaining, deep = mid, tuple(skips), mid
        mirrored = len(unet.up_blocks) - 1 - point.block
        for k, block in enumerate(unet.up_blocks):
            n = len(block.resnets)
            res, remaining = remaining[-n:], remaining[:-n]
            if k != mirrored:
                hidden = _up_block(block, hidden, emb, encoder_hidden_states, res)
                continue
            hidden = _up_layers(block, hidden, emb, encoder_hidden_states, res, range(point.first_up_layer))
            deep = hidden
            hidden = _up_layers(
                block, hidden, emb, encoder_hidden_states, res, range(point.first_up_layer, n)
            )
            hidden = _upsample(block, hidden)
        return _out(unet, hidden), deep


class UNetShallow(nn.Module):
    """(sample, timestep, encoder_hidden_states, deep) -> noise prediction: what DeepCache computes at a
    cached step, the outer layers only, around the deep feature of the last full step."""

    def __init__(self, unet: Any, branch: int) -> None:
        super().__init__()
        self.unet = unet
        self.point = cache_point(dict(unet.config), branch)

    def forward(self, sample: Any, timestep: Any, encoder_hidden_states: Any, deep: Any) -> Any:
        unet, point, ehs = self.unet, self.point, encoder_hidden_states
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = time_embedding(unet, sample, timestep)
        hidden = unet.conv_in(sample)
        skips: tuple[Any, ...] = (hidden,)
        for block in unet.down_blocks[: point.block]:
            if _has_cross_attention(block):
                hidden, res = block(hidden_states=hidden, temb=emb, encoder_hidden_states=ehs)
            else:
                hidden, res = block(hidden_states=hidden, temb=emb)
            skips += res
        _, res = _down_layers(unet.down_blocks[point.block], hidden, emb, ehs, range(point.layer))
        skips += res
        n_up = len(unet.up_blocks)
        # skips consumed by the up blocks outside the mirrored one, which run whole
        outer = sum(len(unet.up_blocks[n_up - 1 - r].resnets) for r in range(point.block))
        mirrored = unet.up_blocks[n_up - 1 - point.block]
        hidden = _up_layers(
            mirrored, deep, emb, ehs, skips[outer:], range(point.first_up_layer, point.up_layers)
        )
        hidden = _upsample(mirrored, hidden)
        remaining = skips[:outer]
        for block in unet.up_blocks[n_up - point.block :]:
            n = len(block.resnets)
            res, remaining = remaining[-n:], remaining[:-n]
            hidden = _up_block(block, hidden, emb, ehs, res)
        return _out(unet, hidden)
