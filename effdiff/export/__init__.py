"""torch + diffusers -> validated ONNX artifacts.

transformers, diffusers and torch read their verbosity at import: notices such as "requires
torchvision" or the ONNX exporter's "torchvision is not installed. Skipping ..." would break our
one-line errors and bury our progress, so they start at error level here unless the user set otherwise.
"""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TORCH_LOGS", "-all")
