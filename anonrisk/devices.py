"""Device selection shared by every stage."""

from __future__ import annotations


def resolve_device(name: str = "auto") -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        from anonrisk.errors import ConfigError

        raise ConfigError(f"device {name!r} requested but no CUDA device is available; use device=cpu or auto")
    return name
