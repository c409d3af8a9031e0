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



#: what the CPU allocator guarantees (and MKL asks for): a tensor at a smaller alignment can take other
#: SIMD code paths, and so round differently, than the same values at this alignment
ALIGNMENT = 64


def own_aligned_(module) -> int:
    """Copy every CPU parameter and buffer of ``module`` that does not start on a 64-byte boundary into a
    fresh (aligned) allocation; returns how many were copied.

    ``from_pretrained`` leaves weights inside the file's buffer at whatever offset the safetensors layout
    gives them (8-byte aligned at best), while a model built in memory owns aligned allocations. MKL
    documents that its results may depend on the alignment of its inputs (conditional numerical
    reproducibility), so on some CPUs the same weights loaded from disk and built in memory gave different
    images. Owning aligned copies makes the arithmetic the same and drops the file buffer."""
    import torch

    copied = 0
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for t in store.values():
                if t is not None and t.device.type == "cpu" and t.data_ptr() % ALIGNMENT:
                    t.data = t.data.clone(memory_format=torch.contiguous_format)
                    copied += 1
    return copied
