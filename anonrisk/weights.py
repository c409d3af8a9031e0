"""Reading a state dict from a local weights file: ``.safetensors``, or a torch file read with
``weights_only=True`` (never arbitrary pickles). Checkpoints that wrap the weights (``{"state_dict": ...}``,
``{"model": ...}``) are unwrapped, and DataParallel's ``module.`` prefixes dropped."""

from __future__ import annotations

import os
import re
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


# ---- the weights root (``ANONRISK_WEIGHTS``) ----------------------------------------------------------

#: a Hugging Face repo id (``owner/name``)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
#: how presets name files under the weights root
WEIGHTS_PREFIX = "weights/"


def localize(value, root: str | os.PathLike | None = None):
    """``value`` (a param, or a list/dict of them) with weights references moved under the weights root
    (``root`` or ``$ANONRISK_WEIGHTS``; unset: unchanged): ``weights/<rel>`` -> ``<root>/<rel>``, and a hub id
    ``owner/name`` -> ``<root>/owner/name`` when that folder exists (where ``anonrisk weights --fetch`` puts it)."""
    root = root if root is not None else os.environ.get("ANONRISK_WEIGHTS")
    if not root:
        return value
    if isinstance(value, list):
        return [localize(v, root) for v in value]
    if isinstance(value, dict):
        return {k: localize(v, root) for k, v in value.items()}
    if not isinstance(value, str):
        return value
    base = Path(root).expanduser()
    if value.startswith(WEIGHTS_PREFIX):
        return str(base / value[len(WEIGHTS_PREFIX):])
    if HUB_ID.match(value) and not Path(value).exists() and (base / value).is_dir():
        return str(base / value)
    return value
