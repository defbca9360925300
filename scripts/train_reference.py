"""Train effdiff's reference text-to-image model on the procedural shapes dataset, on CPU or a GPU.

Stable Diffusion's structure at small scale: a CLIP-style text encoder (our BPE tokenizer), a
UNet2DConditionModel with cross-attention over three resolution levels, an AutoencoderKL (4x), and a
DDIM scheduler config (DDPM linear betas, v-prediction; see REFERENCE_SCHEDULER). Phases: VAE -> encode
a fixed image set -> VAE decoder refinement (encoder frozen) -> UNet + text encoder -> save.
Checkpoints are written atomically every few hundred steps; running again resumes.

  HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_reference.py --work runs/reference \
      --out effdiff/reference/model
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from effdiff.export.models import sd_scheduler_config, text_config, vae_config
from effdiff.export.vocab import write_vocab_files
from effdiff.reference.architectures import ARCHITECTURES, unet_kwargs
from effdiff.reference.dataset import IMAGE_SIZE, all_scenes, render, sample_batch

# DDPM's linear betas rather than SD's scaled-linear ones: at 16x16 latents, SD's schedule leaves so
# much signal at t=T (sqrt(alpha_bar) 0.068) that the mean of x_T carries the background, colour and
# position, and the model learns to read them from the starting noise instead of the prompt. Linear
# betas leave 0.0064. At so little signal an epsilon model's x0 estimate is its error times 1/0.0064
# (saturated, off-colour samples under guidance), so the model predicts v, as SD2 does.
REFERENCE_SCHEDULER = {
    **sd_scheduler_config("v_prediction"),
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
}
MIN_SNR_GAMMA = 5.0  # min-SNR loss weighting: faster convergence, more weight on the noisy steps
# Min-SNR alone weights the x0 error of a step by min(SNR, gamma), which goes to zero at the noisiest
# steps. Those are the only steps where the prompt's position can act: from mid noise on, the noisy
# latent already shows where the shape is, so the model follows the seed. A floor of 1 on that weight
# ("truncated SNR", as in progressive distillation) keeps the layout steps in the loss.
LAYOUT_STEPS = 700  # --layout-share of each batch draws its timestep from [LAYOUT_STEPS, 1000)


def draw_timesteps(batch: int, layout_share: float, gen: torch.Generator) -> torch.Tensor:
    """Uniform over [0, 1000), except a `layout_share` of the rows drawn from [LAYOUT_STEPS, 1000)."""
    t = torch.randint(0, 1000, (batch,), generator=gen)
    if layout_share <= 0:  # no further draw: the defaults keep the shipped run's random stream
        return t
    layout = torch.rand(batch, generator=gen) < layout_share
    t[layout] = torch.randint(LAYOUT_STEPS, 1000, (int(layout.sum()),), generator=gen)
    return t


def v_loss_weight(snr: torch.Tensor, snr_floor: float) -> torch.Tensor:
    """Weight of the squared v error such that the x0 error counts clamp(SNR, snr_floor, gamma) times
    (a squared v error is the squared x0 error times SNR + 1)."""
    return torch.clamp(snr, min=snr_floor, max=MIN_SNR_GAMMA) / (snr + 1)


def build_models(
    vocab_size: int, bos: int, eos: int, pad: int, architecture: str = "v1"
) -> dict[str, torch.nn.Module]:
    import diffusers
    import transformers

    vae = diffusers.AutoencoderKL(**vae_config((32, 64, 64), 1, 16, IMAGE_SIZE))
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(**text_config(vocab_size, 128, 3, 4, 512, "quick_gelu", bos, eos, pad))
    )
    unet = diffusers.UNet2DConditionModel(**unet_kwargs(architecture, IMAGE_SIZE // 4))
    return {"vae": vae, "text_encoder": text, "unet": unet}


def load_weights(model: torch.nn.Module, cls: type, path: Path, flag: str, what: str) -> None:
    """Copy a saved diffusers/transformers component's weights into `model`, or stop with one line."""
    try:
        model.load_state_dict(cls.from_pretrained(path).state_dict())
    except (OSError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0]
        raise SystemExit(f"{flag} {path.parent}: its {path.name} is not {what} ({first})") from None


def init_weights(models: dict[str, torch.nn.Module], folder: Path, architecture: str) -> None:
    """Start the UNet and text encoder from a trained diffusers folder (a fine-tune)."""
    import diffusers
    import transformers

    for name, cls in (("unet", diffusers.UNet2DConditionModel), ("text_encoder", transformers.CLIPTextModel)):
        load_weights(models[name], cls, folder / name, "--init-from", f"a {architecture} one")


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def warn_if_resumed_differently(ckpt: Path, state: dict, **asked: float) -> None:
    """A checkpoint records the settings it was trained with (older ones lack some); resuming with
    others is allowed but said, since the result then follows neither recipe."""
    for key, value in asked.items():
        saved = state.get(key)
        if saved is not None and saved != value:
            print(f"warning: {ckpt} was trained with {key}={saved}; resuming with {value}")


def noisy_latents(z: torch.Tensor, noise: float) -> torch.Tensor:
    """`z` plus Gaussian noise at `noise` times the batch's latent spread. Decoding through it makes the
    encoder keep what the decoder must tell apart (e.g. orange from yellow on black) further apart
    than the noise, i.e. further than the UNet's small errors; relative to the spread, so the encoder
    cannot escape it by scaling its latents up."""
    if noise <= 0:
        return z
    return z + noise * z.detach().std() * torch.randn_like(z)


def train_vae(
    vae: torch.nn.Module, work: Path, steps: int, batch: int, device: str, latent_noise: float = 0.0
) -> None:
    ckpt = work / "vae.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        warn_if_resumed_differently(ckpt, state, latent_noise=latent_noise)
    rng = np.random.default_rng(1000 + start)
    vae.train().requires_grad_(True).to(device)
    bar = tqdm(range(start, steps), desc="vae", initial=start, total=steps)
    for step in bar:
        x = torch.from_numpy(sample_batch(batch, rng)[0]).to(device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(noisy_latents(post.sample(), latent_noise)).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 250 == 0 or step + 1 == steps:
            save_checkpoint(
                ckpt,
                {
                    "model": vae.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step + 1,
                    "latent_noise": latent_noise,
                },
            )
    vae.eval().requires_grad_(False)


def refine_vae_decoder(vae: torch.nn.Module, work: Path, steps: int, batch: int, device: str) -> None:
    """Sharpen colours and edges by training the decoder alone: the encoder is frozen, so the latents
    the UNet learns from do not change."""
    ckpt = work / "vae_decoder.pt"
    decoder = [vae.decoder, vae.post_quant_conv]
    params = [p for m in decoder for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    rng = np.random.default_rng(5000 + start)
    vae.to(device).eval()
    for m in decoder:
        m.train().requires_grad_(True)
    bar = tqdm(range(start, steps), desc="vae decoder", initial=start, total=steps)
    for step in bar:
        x = torch.from_numpy(sample_batch(batch, rng)[0]).to(device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 200 == 0 or step + 1 == steps:
            save_checkpoint(ckpt, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1})
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_dataset(
    vae: torch.nn.Module, work: Path, per_scene: int, device: str
) -> tuple[torch.Tensor, list[str], float]:
    """Latents (posterior means) for `per_scene` jittered renders of every training scene."""
    cache = work / "latents.pt"
    if cache.exists():
        state = torch.load(cache, weights_only=False)
        return state["latents"], state["prompts"], state["scaling"]
    rng = np.random.default_rng(7)
    scenes = all_scenes(held_out=False) * per_scene
    latents, prompts = [], []
    for i in tqdm(range(0, len(scenes), 256), desc="encode"):
        chunk = scenes[i : i + 256]
        arr = np.stack([np.asarray(render(s, rng), dtype=np.float32) for s in chunk]).transpose(0, 3, 1, 2)
        x = torch.from_numpy(arr / 127.5 - 1.0).float().to(device)
        latents.append(vae.encode(x).latent_dist.mean.cpu())
        prompts += [s.prompt for s in chunk]
    lat = torch.cat(latents)
    scaling = float(1.0 / lat.std())
    save_checkpoint(cache, {"latents": lat, "prompts": prompts, "scaling": scaling})
    return lat, prompts, scaling


def train_unet(
    models: dict,
    tokenizer,
    latents: torch.Tensor,
    prompts: list[str],
    scaling: float,
    work: Path,
    steps: int,
    batch: int,
    device: str,
    architecture: str = "v1",
    snr_floor: float = 0.0,
    layout_share: float = 0.0,
    peak_lr: float = 4e-4,
) -> torch.nn.Module:
    import diffusers

    unet, text = models["unet"].to(device).train(), models["text_encoder"].to(device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=1e-2)
    sched = diffusers.DDPMScheduler(
        **{k: v for k, v in REFERENCE_SCHEDULER.items() if k not in ("set_alpha_to_one", "steps_offset")}
    )
    ckpt = work / "unet.pt"
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state.get("arch", "v1") != architecture:
            raise SystemExit(
                f"{ckpt} holds a {state.get('arch', 'v1')} UNet; give --arch {architecture} another --work"
            )
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        warn_if_resumed_differently(ckpt, state, snr_floor=snr_floor, layout_share=layout_share)
    ids_all = tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    gen = torch.Generator().manual_seed(start)
    lat = latents * scaling
    acp = sched.alphas_cumprod.to(device)
    warmup = 300
    bar = tqdm(range(start, steps), desc="unet", initial=start, total=steps)
    for step in bar:
        lr = peak_lr * min(1.0, (step + 1) / warmup) * (0.5 * (1 + np.cos(np.pi * step / steps)) * 0.9 + 0.1)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(lat), (batch,), generator=gen)
        x0 = lat[idx].to(device)
        ids = ids_all[idx].clone()
        drop = torch.rand(batch, generator=gen) < 0.1  # unconditional rows for classifier-free guidance
        ids[drop] = empty
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = draw_timesteps(batch, layout_share, gen).to(device)
        a = acp[t].view(-1, 1, 1, 1)
        signal, sigma = a.sqrt(), (1 - a).sqrt()
        xt = signal * x0 + sigma * noise
        ehs = text(ids.to(device))[0]
        target = signal * noise - sigma * x0  # v
        snr = a / (1 - a)
        weight = v_loss_weight(snr, snr_floor)
        loss = (weight * (unet(xt, t, ehs).sample - target).pow(2)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}")
        if (step + 1) % 250 == 0 or step + 1 == steps:
            save_checkpoint(
                ckpt,
                {
                    "unet": unet.state_dict(),
                    "text": text.state_dict(),
                    "ema": ema.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step + 1,
                    "arch": architecture,
                    "snr_floor": snr_floor,
                    "layout_share": layout_share,
                },
            )
    text.eval().requires_grad_(False)
    return ema


def main() -> None:
    import diffusers
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/reference"), help="checkpoints (resumable)")
    parser.add_argument("--out", type=Path, default=Path("effdiff/reference/model"), help="diffusers folder")
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--unet-steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--decoder-steps", type=int, default=1600, help="VAE decoder refinement (encoder frozen)"
    )
    parser.add_argument(
        "--phases",
        default="vae,decoder,unet,save",
        help="which phases to run; each resumes from its checkpoint",
    )
    parser.add_argument("--per-scene", type=int, default=8, help="jittered renders per training scene")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--vae-from",
        type=Path,
        help="a diffusers folder whose VAE to use as it is (e.g. effdiff/reference/model) instead of "
        "training one: the VAE phases are skipped",
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        help="a diffusers folder of the same --arch to fine-tune (e.g. effdiff/reference/model): its "
        "VAE is used as it is (as --vae-from) and its UNet and text encoder are the starting weights",
    )
    parser.add_argument(
        "--vae-init",
        type=Path,
        help="a diffusers folder whose VAE the VAE phases continue from (--vae-steps more joint steps, "
        "then the decoder refinement) instead of random weights; with --init-from, the UNet is then "
        "fine-tuned on the new VAE's latents",
    )
    parser.add_argument(
        "--vae-latent-noise",
        type=float,
        default=0.0,
        help="noise added to the latents the joint VAE phase decodes, relative to their spread: 0.03 "
        "keeps the colours the UNet must tell apart further apart in latent space (0.1 merges them)",
    )
    parser.add_argument("--lr", type=float, default=4e-4, help="peak learning rate of the UNet phase")
    parser.add_argument(
        "--arch",
        default="v1",
        choices=sorted(ARCHITECTURES),
        help="UNet layout (effdiff/reference/architectures.py): v1 is the shipped model's, v2 the next",
    )
    parser.add_argument(
        "--snr-floor",
        type=float,
        default=0.0,
        help="floor of the x0-error weight (0: plain min-SNR, as the shipped v1; 1: truncated SNR)",
    )
    parser.add_argument(
        "--layout-share",
        type=float,
        default=0.0,
        help=f"share of each batch trained at the noisiest steps (t >= {LAYOUT_STEPS}): the layout steps",
    )
    args = parser.parse_args()
    for flag, folder in (
        ("--init-from", args.init_from),
        ("--vae-from", args.vae_from),
        ("--vae-init", args.vae_init),
    ):
        if folder and not (folder / "vae" / "config.json").is_file():
            raise SystemExit(f"{flag} {folder}: not a diffusers pipeline folder (no vae/config.json)")
    if args.vae_init and args.vae_from:
        raise SystemExit("--vae-init and --vae-from both choose the VAE: pass one")
    if args.vae_latent_noise < 0:
        raise SystemExit(f"--vae-latent-noise {args.vae_latent_noise}: a share of the latents' spread, >= 0")
    if args.vae_latent_noise and (args.vae_from or (args.init_from and not args.vae_init)):
        raise SystemExit("--vae-latent-noise acts in the VAE phases, which --vae-from/--init-from skip")
    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    vocab_dir = args.work / "vocab"
    write_vocab_files(vocab_dir)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(vocab_dir, model_max_length=77)
    models = build_models(
        len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, args.arch
    )
    for name, m in models.items():
        print(f"{name}: {sum(p.numel() for p in m.parameters()) / 1e6:.2f} M parameters")
    start = time.time()
    phases = set(args.phases.split(","))
    if args.init_from:
        init_weights(models, args.init_from, args.arch)
        if not args.vae_init:
            args.vae_from = args.init_from
    if args.vae_init:
        load_weights(
            models["vae"], diffusers.AutoencoderKL, args.vae_init / "vae", "--vae-init", "this model's VAE"
        )
    if args.vae_from:
        models["vae"] = (
            diffusers.AutoencoderKL.from_pretrained(args.vae_from / "vae").eval().requires_grad_(False)
        )
    else:
        train_vae(models["vae"], args.work, args.vae_steps, 32, args.device, args.vae_latent_noise)
    latents, prompts, scaling = encode_dataset(models["vae"], args.work, args.per_scene, args.device)
    if "decoder" in phases and not args.vae_from:
        refine_vae_decoder(models["vae"], args.work, args.decoder_steps, 32, args.device)
    if args.init_from and not args.vae_init:  # the starting UNet's latents are scaled by its own factor
        scaling = float(models["vae"].config.scaling_factor)
    if "unet" not in phases:
        return
    print(f"latent scaling factor {scaling:.4f}; {len(prompts)} training images")
    ema = train_unet(
        models,
        tokenizer,
        latents,
        prompts,
        scaling,
        args.work,
        args.unet_steps,
        args.batch,
        args.device,
        args.arch,
        args.snr_floor,
        args.layout_share,
        args.lr,
    )
    vae = models["vae"].cpu()
    vae.register_to_config(scaling_factor=scaling)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=models["text_encoder"].cpu(),
        tokenizer=tokenizer,
        unet=ema.cpu(),
        scheduler=diffusers.DDIMScheduler(**REFERENCE_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file()) / 2**20
    print(f"saved {args.out} ({size:.1f} MiB) after {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
