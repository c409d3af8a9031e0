"""Reading a state dict from a local weights file: ``.safetensors``, or a torch file read with
``weights_only=True`` (never arbitrary pickles). Checkpoints that wrap the weights (``{"state_dict": ...}``,
``{"model": ...}``) are unwrapped, and DataParallel's ``module.`` prefixes dropped."""

from __future__ import annotations

import os
from pathlib import Path


def read_state_dict(path: str | os.PathLike) -> dict:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}
