"""effdiff: split-UNet export and a light runtime for Stable-Diffusion-class models."""

__version__ = "0.1.0"
