#!/usr/bin/env bash
# Train the reference model on a lent GPU machine (the `device` tool), in one call.
#
# That machine has torch (CUDA) and transformers but no diffusers, and sends back at most 16 MiB per
# file, so diffusers travels as a wheel and the trained model comes back as a tar in 15 MiB parts.
#
#   here:    .venv/bin/pip download diffusers==0.42.1 --no-deps -d runs/wheels
#   device:  run(command="bash scripts/device_train.sh --arch v2 --snr-floor 1 --layout-share 0.5",
#                carry=["runs/wheels"], timeout_s=580)
#   here:    cat FILES_AT/model.tar.part* | tar -x -C runs/   # -> runs/model, a diffusers folder
#
# Arguments are passed to scripts/train_reference.py. Without a GPU (or OUT) it runs here on the CPU,
# which is how it is smoke-tested: OUT=/tmp/o bash scripts/device_train.sh --vae-steps 2 ...
set -euo pipefail
OUT=${OUT:?set OUT to the folder the results go to}
if ! python -c "import diffusers" 2>/dev/null; then
    pip install --no-deps -q runs/wheels/*.whl
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
device=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU: $device"
# tqdm redraws with carriage returns: keep one line in 50 of them in the log that comes back
python scripts/train_reference.py --work "$WORK" --out "$WORK/model" --device "$device" "$@" 2>&1 \
    | tr '\r' '\n' | awk 'NR % 50 == 1 || !/it\/s/' | tee "$OUT/train.log"
tar -C "$WORK" -cf - model | split -b 15M - "$OUT/model.tar.part"
ls -la "$OUT"
