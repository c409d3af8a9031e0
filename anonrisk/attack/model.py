"""The attack encoder: a timm backbone without classifier plus a projection head; unit-norm embeddings.

Weights come from a local file (``.safetensors``, or a ``.pt``/``.pth`` state dict read with
``weights_only=True``) or random initialisation; never a download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from anonrisk.errors import ConfigError

MEAN, STD = 0.5, 0.25


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"attack.pretrained: weights file not found: {path}")
    from anonrisk.weights import read_state_dict

    return read_state_dict(path)


INPUT_CHANNELS = {"rgb": 3, "edges": 1, "rgb+edges": 4}


def sobel_edges(x: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude of the mean channel, each image scaled to unit mean: a colour-free view of the
    structure that conditioned generators keep."""
    gray = x.mean(1, keepdim=True)
    k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device, dtype=x.dtype)
    gx = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), k.view(1, 1, 3, 3))
    gy = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), k.t().reshape(1, 1, 3, 3))
    mag = torch.sqrt(gx * gx + gy * gy + 1e-6)
    return mag / (mag.mean(dim=(2, 3), keepdim=True) + 1e-6) - 1.0


class Encoder(nn.Module):
    """``input`` picks what the backbone sees: the image (``rgb``, the paper's attack), its Sobel edge map
    (``edges``), or both (``rgb+edges``)."""

    def __init__(self, backbone: str = "resnet18", embed_dim: int = 128, pretrained: Optional[str] = None, input: str = "rgb"):
        super().__init__()
        import timm

        self.input = input
        try:
            self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0, in_chans=INPUT_CHANNELS[input])
        except RuntimeError as exc:  # timm: "Unknown model (...)"
            raise ConfigError(f"attack.backbone: {exc}; see timm.list_models()") from None
        if pretrained:
            missing, unexpected = self.backbone.load_state_dict(load_state_dict(pretrained), strict=False)
            if len(missing) > len(self.backbone.state_dict()) // 2:
                raise ConfigError(f"attack.pretrained: {pretrained} does not fit {backbone} ({len(missing)} keys missing)")
        width = self.backbone.num_features
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, embed_dim))

    @staticmethod
    def preprocess(images_uint8: torch.Tensor) -> torch.Tensor:
        """(N,H,W,3) or (N,3,H,W) uint8 -> normalised float (N,3,H,W)."""
        x = images_uint8
        if x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
        return (x.float() / 255.0 - MEAN) / STD

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input == "edges":
            x = sobel_edges(x)
        elif self.input == "rgb+edges":
            x = torch.cat([x, sobel_edges(x)], dim=1)
        return F.normalize(self.head(self.backbone(x)), dim=-1)
