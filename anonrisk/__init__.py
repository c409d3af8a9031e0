"""anonrisk: how much identity survives diffusion-based image anonymization."""

__version__ = "0.1.0"
