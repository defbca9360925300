"""torch + diffusers -> validated ONNX artifacts.

transformers and diffusers read their verbosity at import: notices such as "requires torchvision"
would break our one-line errors, so they start at error level here unless the user set otherwise.
"""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
