"""Embed records with a trained encoder, in batches, without gradients."""

from __future__ import annotations

from typing import Sequence

import torch

from anonrisk.attack.model import Encoder
from anonrisk.data.io import load_batch
from anonrisk.data.records import FaceRecord


@torch.no_grad()
def embed_records(model, records: Sequence[FaceRecord], image_size: int, device: str = "cpu", batch_size: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(records), batch_size):
        images = torch.from_numpy(load_batch([r.path for r in records[i : i + batch_size]], image_size))
        out.append(model(Encoder.preprocess(images).to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 1)
