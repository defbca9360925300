"""Encoder share of UNet compute and size of each reference-model UNet layout.

The layouts are in effdiff/reference/architectures.py. Each one is exported beside the shipped text
encoder and VAE. Its UNet has random weights: time and size do not depend on training. Each layout is
read two ways:
- FLOPs of one forward pass (torch's FlopCounterMode), split at the encoder/decoder boundary. This
  does not depend on the machine. SD1.5: 32.5 % (FACTS).
- ONNX Runtime time: benchmarks/propagation.py's isolated calls at 2 rows, the benchmark that gave
  33 % for SD1.5 at 256x256. `--artifacts` times another folder the same way in the same run, e.g.
  the SD1.5 architecture.
#17 asks for an encoder share within 10 points of SD1.5's and a model of at most 40 MB.

  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/reference_architecture.py [--archs v1,v2] \
      [--artifacts artifacts/sd15-arch]   # about 3 minutes without --artifacts
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from int8_reference import machine  # benchmarks/ is this script's folder, so it is on sys.path
from propagation import isolated_call_times

from effdiff.export.onnx import export_onnx
from effdiff.reference import MODEL_DIR
from effdiff.reference.architectures import unet_kwargs
from effdiff.reference.dataset import IMAGE_SIZE
from effdiff.runtime.pipeline import Pipeline

ENCODER_MODULES = ("conv_in", "time_embedding", "down_blocks", "mid_block")


def flop_share(unet: object, latent: int) -> tuple[float, float]:
    """(GFLOPs of one forward pass at 2 rows, the encoder's share of them)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 4, latent, latent)
    states = torch.randn(2, 77, unet.config.cross_attention_dim)  # type: ignore[attr-defined]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500, 500]), states)  # type: ignore[operator]
    counts = counter.get_flop_counts()
    total = sum(counts["Global"].values())
    # top-level modules, and the blocks of the two ModuleLists
    parts = [k for k in counts if k.count(".") == 1 and not k.endswith(("down_blocks", "up_blocks"))]
    parts += [k for k in counts if k.count(".") == 2 and k.split(".")[1] in ("down_blocks", "up_blocks")]
    encoder = sum(sum(counts[k].values()) for k in parts if k.split(".")[1] in ENCODER_MODULES)
    return total / 1e9, encoder / total


def main() -> None:
    import diffusers
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="v1,v2")
    parser.add_argument("--artifacts", type=Path, help="another exported folder, timed the same way")
    parser.add_argument("--repeat", type=int, default=20, help="calls per median (the small ones take ms)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    latent = IMAGE_SIZE // 4
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            torch.manual_seed(0)
            unet = diffusers.UNet2DConditionModel(**unet_kwargs(arch, latent)).eval()
            params = sum(p.numel() for p in unet.parameters())
            gflops, share = flop_share(unet, latent)
            folder = Path(tmp) / arch
            shutil.copytree(MODEL_DIR, folder, ignore=shutil.ignore_patterns("unet"))
            unet.save_pretrained(folder / "unet", safe_serialization=True)
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            out = Path(tmp) / f"{arch}-onnx"
            export_onnx(str(folder), out, progress=False)
            _, enc, dec = isolated_call_times(Pipeline.load(out), 2, latent, latent, args.repeat)
            lines.append(
                f"| reference {arch}, {latent}x{latent} latents | {params / 1e6:.2f} M | "
                f"{size / 1e6:.1f} MB | {gflops:.2f} | {share:.1%} | {enc * 1e3:.1f} / {dec * 1e3:.1f} ms | "
                f"{enc / (enc + dec):.0%} |"
            )
    if args.artifacts:
        pipe = Pipeline.load(args.artifacts)
        h, w = pipe.geometry.latent_size(*pipe.default_size())
        _, enc, dec = isolated_call_times(pipe, 2, h, w, 3)
        lines.append(
            f"| {args.artifacts.name}, {h}x{w} latents | — | — | — | — | {enc:.3f} / {dec:.3f} s | "
            f"{enc / (enc + dec):.0%} |"
        )
    print(
        "\n| UNet | parameters | model fp32 | GFLOPs (2 rows) | encoder share of FLOPs "
        "| encoder / decoder call (ONNX Runtime, 2 rows) | encoder share of time |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
