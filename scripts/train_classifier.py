"""Train the attribute classifier that scores prompt adherence, and export it to ONNX (torch-free scoring).

A small CNN with one head per attribute (kind, colour, size, position, background) and a 64-d feature
layer used for the domain Frechet distance. Trained on rendered scenes of every combination (it is a
judge, not the generator), with noise and blur so that it also reads imperfect generated images.

  .venv/bin/python scripts/train_classifier.py --out effdiff/reference/classifier.onnx
"""

from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from effdiff.reference.dataset import ATTRIBUTES, IMAGE_SIZE, all_scenes, render

HEADS = {name: len(values) for name, values in ATTRIBUTES.items()}


class AttributeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        chans = (3, 32, 64, 96, 128)
        layers: list[nn.Module] = []
        for cin, cout in itertools.pairwise(chans):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(), nn.MaxPool2d(2)]
        self.body = nn.Sequential(*layers)  # 64 -> 4
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, 64), nn.SiLU())
        self.heads = nn.Linear(64, sum(HEADS.values()))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(self.body(image))
        return self.heads(feats), feats


def batch(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    scenes = all_scenes()
    picks = [scenes[i] for i in rng.integers(0, len(scenes), n)]
    imgs = np.stack([np.asarray(render(s, rng), np.float32) for s in picks]).transpose(0, 3, 1, 2) / 127.5 - 1
    x = torch.from_numpy(imgs.astype(np.float32))
    # robustness to generated images: noise, blur, slight colour shifts
    x = x + torch.randn_like(x) * float(rng.uniform(0, 0.15))
    if rng.random() < 0.5:
        x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    x = x + torch.from_numpy(rng.normal(0, 0.05, (n, 3, 1, 1)).astype(np.float32))
    labels = torch.tensor([[s.labels()[k] for k in HEADS] for s in picks])
    return x.clamp(-1.2, 1.2), labels


def loss_and_acc(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    loss, correct, offset = 0.0, 0.0, 0
    for i, n in enumerate(HEADS.values()):
        part = logits[:, offset : offset + n]
        loss = loss + F.cross_entropy(part, labels[:, i])
        correct += (part.argmax(1) == labels[:, i]).float().mean().item()
        offset += n
    return loss, correct / len(HEADS)


def strip_source_paths(path: Path) -> None:
    """The exporter records source locations (this machine's paths) in node metadata; drop them."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(model, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("effdiff/reference/classifier.onnx"))
    parser.add_argument("--steps", type=int, default=1200)
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = AttributeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    bar = tqdm(range(args.steps), desc="classifier")
    for step in bar:
        x, y = batch(64, rng)
        loss, acc = loss_and_acc(net(x)[0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}")
    net.eval()
    with torch.no_grad():
        x, y = batch(512, np.random.default_rng(123))
        _, acc = loss_and_acc(net(x)[0], y)
    print(f"held-out render accuracy (mean over attributes): {acc:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp.onnx")
    torch.onnx.export(
        net,
        (torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE),),
        str(tmp),
        dynamo=True,
        input_names=["image"],
        output_names=["logits", "features"],
        dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
        external_data=False,
    )
    strip_source_paths(tmp)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB); heads: {HEADS}")


if __name__ == "__main__":
    main()
