#!/usr/bin/env bash
# One-command setup: .venv/ with everything to export, run and test on CPU (extra `cpu` = onnxruntime;
# a CUDA machine installs `gpu` instead, never both: they provide the same module).
# CPU torch goes in first and pinned: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[cpu,export,bench,dev,distributed]"
.venv/bin/python -m pip check
echo "effdiff is set up: source .venv/bin/activate"
