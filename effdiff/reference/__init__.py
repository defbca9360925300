"""effdiff's reference model: the shipped weights, the procedural dataset it was trained on, the
attribute classifier that judges its images, and the scenes the demo and benchmarks use.

A low layer: numpy, PIL and onnxruntime only, so export, runtime, calibration, the knowledge base and
the benchmarks can all use it.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE / "model"  # a diffusers StableDiffusionPipeline folder (scripts/train_reference.py)
CLASSIFIER = HERE / "classifier.onnx"  # the attribute classifier (scripts/train_classifier.py)
MODEL_NAME = "reference"  # what `--model` takes, and what a manifest's source.model then says
