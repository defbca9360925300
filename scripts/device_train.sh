#!/usr/bin/env bash
# Train the reference model on a lent GPU machine (the `device` tool), in one call.
#
# That machine has torch (CUDA) and transformers but no diffusers, and sends back at most 16 MiB per
# file, so diffusers travels as a wheel and the trained model comes back as a tar in 15 MiB parts.
#
#   here:    .venv/bin/pip download diffusers==0.42.1 importlib_metadata zipp --no-deps -d runs/wheels
#   device:  run(command="bash scripts/device_train.sh --arch v2 --snr-floor 1 --layout-share 0.5",
#                carry=["runs/wheels"], timeout_s=580)
#   here:    cat FILES_AT/model.tar.part* | tar -x -C runs/   # -> runs/model, a diffusers folder
#
# Arguments are passed to scripts/train_reference.py. OUT is the folder the results go to (the device
# tool sets it). Training stops after TRAIN_S seconds (default 500, inside the call's limit) and the
# last UNet checkpoint is saved as the model, so a run that is too long still returns weights; the
# log says at which step. Without a GPU it runs on the CPU, which is how it is smoke-tested here:
#   OUT=/tmp/o bash scripts/device_train.sh --vae-steps 2 --decoder-steps 2 --unet-steps 3 --per-scene 1
set -euo pipefail
OUT=${OUT:?set OUT to the folder the results go to}
if ! python -c "import diffusers" 2>/dev/null; then
    python -m pip install --no-deps -q runs/wheels/*.whl
    python -c "import diffusers" || { echo "diffusers does not import after installing runs/wheels"; exit 1; }
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
device=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU: $device"

train() {
    # tqdm redraws with carriage returns: keep one progress line in 50 in the log that comes back
    "$@" 2>&1 | stdbuf -oL tr '\r' '\n' | awk 'NR % 50 == 1 || !/it\/s|s\/it/ { print; fflush() }' \
        | tee -a "$OUT/train.log"
    return "${PIPESTATUS[0]}"
}
args=(scripts/train_reference.py --work "$WORK" --out "$WORK/model" --device "$device" "$@")
rc=0
train timeout "${TRAIN_S:-500}" python "${args[@]}" || rc=$?
if [ "$rc" -eq 124 ] && [ -f "$WORK/unet.pt" ]; then
    step=$(python -c "import sys, torch; print(torch.load(sys.argv[1], weights_only=False)['step'])" \
        "$WORK/unet.pt")
    echo "stopped after ${TRAIN_S:-500} s: saving the UNet checkpoint of step $step" | tee -a "$OUT/train.log"
    rc=0
    train python "${args[@]}" --unet-steps "$step" || rc=$?
fi
[ "$rc" -eq 0 ] || { echo "training failed (exit $rc); see $OUT/train.log"; exit "$rc"; }
tar -C "$WORK" -cf - model | split -b 15M - "$OUT/model.tar.part"
ls -la "$OUT"
