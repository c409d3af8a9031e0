"""The attack encoder: a timm backbone without classifier plus a projection head; unit-norm embeddings.

Weights come from a local file (``.safetensors``, or a ``.pt``/``.pth`` state dict read with
``weights_only=True``) or random initialisation; never a download. A pretrained 3-channel checkpoint starts
every ``train.input``: timm adapts its stem the way it does for its own pretrained weights
(``adapt_input_conv``), and the backbone sees its input normalised with its pretrained mean/std.
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
        raise ConfigError(f"train.pretrained: weights file not found: {path}")
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


def _create_backbone(backbone: str, in_chans: int, pretrained: Optional[str]) -> nn.Module:
    """timm's model without classifier; with ``pretrained``, the local file's weights loaded through timm's own
    pretrained path (``pretrained_cfg_overlay`` with the state dict: no download), which adapts a 3-channel stem
    to ``in_chans`` with ``adapt_input_conv`` (1 channel: the RGB filters summed; 4: the RGB filters repeated
    cyclically, the 4th a copy of the red one, all scaled by 3/4) and drops the checkpoint's classifier."""
    import timm

    try:
        if not pretrained:
            return timm.create_model(backbone, pretrained=False, num_classes=0, in_chans=in_chans)
        state = load_state_dict(pretrained)
        # source=None: the state dict, never the hub, whatever the model's default pretrained config names
        model = timm.create_model(backbone, pretrained=True, num_classes=0, in_chans=in_chans,
                                  pretrained_cfg_overlay=dict(state_dict=dict(state), source=None))
    except RuntimeError as exc:  # timm: "Unknown model (...)"; a checkpoint whose shapes do not fit
        if not pretrained or "Unknown model" in str(exc):
            raise ConfigError(f"train.backbone: {exc}; see timm.list_models()") from None
        raise ConfigError(f"train.pretrained: {pretrained} does not fit {backbone}: {str(exc).splitlines()[0][:300]}") from None
    missing = sorted(set(model.state_dict()) - set(state))  # timm loads leniently: refuse a partial fit here
    if missing:
        raise ConfigError(f"train.pretrained: {pretrained} does not fit {backbone}: {len(missing)} of its "
                          f"{len(model.state_dict())} tensors are missing ({', '.join(missing[:3])}, ...)")
    return model


class Encoder(nn.Module):
    """``input`` picks what the backbone sees: the image (``rgb``, the paper's attack), its Sobel edge map
    (``edges``), or both (``rgb+edges``).

    Normalisation: callers hand in ``Encoder.preprocess`` output (every channel (x - 0.5) / 0.25; augmentation
    works in that space). A random-init backbone sees exactly that. A pretrained one (``pretrained`` given,
    or ``pretrained_normalization`` when rebuilding a trained encoder without its checkpoint) sees its RGB
    channels re-normalised to the mean/std of its pretrained config, what its weights were trained on. The
    Sobel edge channel is computed before that, from the fixed-normalised image, and is scale-free (each
    image's gradient magnitude divided by its mean): it is the same whatever the backbone's normalisation.
    """

    def __init__(self, backbone: str = "resnet18", embed_dim: int = 128, pretrained: Optional[str] = None, input: str = "rgb",
                 pretrained_normalization: Optional[bool] = None):
        super().__init__()
        self.input = input
        self.backbone = _create_backbone(backbone, INPUT_CHANNELS[input], pretrained)
        width = self.backbone.num_features
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, embed_dim))
        self.renormalize = bool(pretrained) if pretrained_normalization is None else pretrained_normalization
        mean, std = self.input_mean_std()
        # x_backbone = (x_fixed * STD + MEAN - mean) / std = x_fixed * scale + shift. Plain numbers, not buffers:
        # not part of the weights, so engines export and reload encoders unchanged
        self.rgb_affine = tuple((STD / s, (MEAN - m) / s) for m, s in zip(mean, std))
        self._affine_cache: dict = {}

    def input_mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The RGB mean/std the backbone sees its input normalised with."""
        if not self.renormalize:
            return (MEAN,) * 3, (STD,) * 3
        cfg = self.backbone.pretrained_cfg
        mean, std = tuple(cfg.get("mean", (MEAN,) * 3)), tuple(cfg.get("std", (STD,) * 3))
        if len(mean) != 3 or len(std) != 3:
            raise ConfigError(f"train.pretrained: the backbone's pretrained config has mean {mean}, std {std}: expected RGB values")
        return mean, std

    @staticmethod
    def preprocess(images_uint8: torch.Tensor) -> torch.Tensor:
        """(N,H,W,3) or (N,3,H,W) uint8 -> normalised float (N,3,H,W)."""
        x = images_uint8
        if x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
        return (x.float() / 255.0 - MEAN) / STD

    def _renormalized(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in self._affine_cache:
            scale, shift = (torch.tensor(v, device=x.device, dtype=x.dtype).view(1, 3, 1, 1) for v in zip(*self.rgb_affine))
            self._affine_cache[key] = (scale, shift)
        scale, shift = self._affine_cache[key]
        return x * scale + shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = self._renormalized(x) if self.renormalize else x
        if self.input == "edges":
            x = sobel_edges(x)
        elif self.input == "rgb+edges":
            x = torch.cat([rgb, sobel_edges(x)], dim=1)
        else:
            x = rgb
        return F.normalize(self.head(self.backbone(x)), dim=-1)
