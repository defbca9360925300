#!/usr/bin/env bash
# Regenerates README's bench tables with `effdiff bench` (not run in CI; about 20 minutes on 2 CPU cores).
#   reference model: every configuration and both peers, with prompt adherence (via `effdiff demo`)
#   SD1.5 architecture, random weights, 256x256: latency and memory only (quality is meaningless there)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
.venv/bin/effdiff demo --out benchmarks/results/demo
[ -f artifacts/sd15-arch/manifest.json ] || .venv/bin/python benchmarks/export_sd15_arch.py --out artifacts/sd15-arch
# Run on an idle machine: PyTorch (the peers) slows far more than ONNX Runtime under CPU contention.
.venv/bin/effdiff bench --artifacts artifacts/sd15-arch --configs full,cache:3 --height 256 --width 256 \
    --repeat 2 --warmup 1 --peers diffusers,deepcache --out benchmarks/results/bench_sd15-arch_256_idle
