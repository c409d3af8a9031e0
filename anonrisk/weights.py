"""Reading a state dict from a local weights file: ``.safetensors``, or a torch file read with
``weights_only=True`` (never arbitrary pickles); a ``{"state_dict": ...}`` wrapper is unwrapped."""

from __future__ import annotations

import os
from pathlib import Path


def read_state_dict(path: str | os.PathLike) -> dict:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state
