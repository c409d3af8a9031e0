"""What anonymization costs: image utility of the anonymized test images against their originals.

- SSIM (colour, skimage) and PSNR (dB, capped at ``PSNR_CAP`` for identical images) always.
- LPIPS when local weights are given: a torchvision AlexNet/VGG16 feature extractor plus LPIPS' linear
  layers (``evaluate.utility.lpips_backbone_weights`` and ``lpips_linear_weights``).
- FID and KID when a local torchvision Inception-v3 state dict is given (``evaluate.utility.fid_weights``):
  Frechet distance and the unbiased polynomial-kernel MMD between the 2048-d pool features of the originals
  and of the anonymized images. With other weights than the TF-ported FID Inception the numbers rank
  anonymizers but are not comparable to published FID values.

A metric without weights is skipped with the reason under ``skipped``; nothing is downloaded, and a missing
file never aborts the rest.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from anonrisk.config.schema import UtilityConfig
from anonrisk.errors import Unavailable

PSNR_CAP = 100.0
LPIPS_LAYERS = {"alex": ([1, 4, 7, 9, 11], [64, 192, 384, 256, 256]), "vgg": ([3, 8, 15, 22, 29], [64, 128, 256, 512, 512])}


def ssim_psnr(original: np.ndarray, anonymized: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import structural_similarity

    ssim = float(structural_similarity(original, anonymized, channel_axis=-1, data_range=255))
    mse = float(np.mean((original.astype(np.float64) - anonymized.astype(np.float64)) ** 2))
    psnr = PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * np.log10(255.0**2 / mse))
    return ssim, float(psnr)


def _state(path: str, key: str) -> dict:
    from pathlib import Path

    from anonrisk.weights import read_state_dict

    p = Path(path).expanduser()
    if not p.exists():
        raise Unavailable(f"{key}: weights file not found: {p}")
    return read_state_dict(p)


class LPIPS:
    """Learned perceptual distance (Zhang et al. 2018) from local weights: channel-normalised features of
    five layers, squared differences weighted by the linear layers, averaged over space, summed."""

    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)

    def __init__(self, cfg: UtilityConfig):
        import torch
        import torchvision

        if not cfg.lpips_backbone_weights or not cfg.lpips_linear_weights:
            raise Unavailable("LPIPS: evaluate.utility.lpips_backbone_weights and lpips_linear_weights are not both set "
                              "(local torchvision AlexNet/VGG16 weights and LPIPS linear layers; never downloaded)")
        state = _state(cfg.lpips_backbone_weights, "LPIPS: evaluate.utility.lpips_backbone_weights")
        lin = _state(cfg.lpips_linear_weights, "LPIPS: evaluate.utility.lpips_linear_weights")
        net = torchvision.models.alexnet() if cfg.lpips_net == "alex" else torchvision.models.vgg16()
        backbone = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        missing, _ = net.features.load_state_dict(backbone, strict=False)
        if missing:
            raise Unavailable(f"LPIPS: evaluate.utility.lpips_backbone_weights: not a torchvision {cfg.lpips_net} state dict ({len(missing)} feature keys missing)")
        self.features = net.features.eval()
        self.taps, widths = LPIPS_LAYERS[cfg.lpips_net]
        try:
            self.lin = [lin[f"lin{i}.model.1.weight"].float().reshape(1, w, 1, 1) for i, w in enumerate(widths)]
        except (KeyError, RuntimeError) as exc:
            raise Unavailable(f"LPIPS: evaluate.utility.lpips_linear_weights: expected keys lin0..lin4.model.1.weight for {cfg.lpips_net}: {exc}") from None
        self.shift = torch.tensor(self.SHIFT).view(1, 3, 1, 1)
        self.scale = torch.tensor(self.SCALE).view(1, 3, 1, 1)

    def _feats(self, x):
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x / (x.norm(dim=1, keepdim=True) + 1e-10))
            if i >= self.taps[-1]:
                break
        return out

    def __call__(self, a: np.ndarray, b: np.ndarray, batch: int = 32) -> np.ndarray:
        """Per-pair distances of uint8 (N,H,W,3) batches."""
        import torch

        def tensor(x):
            return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0

        out = []
        with torch.no_grad():
            for i in range(0, len(a), batch):
                fa, fb = self._feats(tensor(a[i : i + batch])), self._feats(tensor(b[i : i + batch]))
                d = sum(((x - y) ** 2 * w).sum(1).mean((1, 2)) for x, y, w in zip(fa, fb, self.lin))
                out.append(d)
        return torch.cat(out).numpy()


class InceptionFeatures:
    """2048-d pool features of a torchvision Inception-v3 loaded from a local state dict."""

    def __init__(self, cfg: UtilityConfig):
        import torch
        import torchvision

        if not cfg.fid_weights:
            raise Unavailable("FID/KID: evaluate.utility.fid_weights is not set (a local torchvision Inception-v3 state dict; never downloaded)")
        state = {k: v for k, v in _state(cfg.fid_weights, "FID/KID: evaluate.utility.fid_weights").items() if not k.startswith("AuxLogits.")}
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
        missing, _ = net.load_state_dict(state, strict=False)
        if [k for k in missing if not k.startswith("fc.")]:
            raise Unavailable(f"FID/KID: evaluate.utility.fid_weights: {cfg.fid_weights} is not a torchvision inception_v3 state dict ({len(missing)} keys missing)")
        net.fc = torch.nn.Identity()
        self.net = net.eval()
        self.size = cfg.fid_image_size

    def __call__(self, images: np.ndarray, batch: int = 32) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        out = []
        with torch.no_grad():
            for i in range(0, len(images), batch):
                x = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float() / 255.0
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
                out.append(self.net((x - mean) / std).double())
        return torch.cat(out).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets: |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    Tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of S_a S_b, which equal those of
    the symmetric matrix C C^T / ((n_a - 1)(n_b - 1)) with C = A_c B_c^T (centred features): an n x n
    eigenproblem instead of a d x d matrix square root, exact, and fast when there are fewer images than
    feature dimensions."""
    ac, bc = a - a.mean(0), b - b.mean(0)
    na, nb = len(a) - 1, len(b) - 1
    if len(a) <= a.shape[1]:
        c = ac @ bc.T
        eig = np.linalg.eigvalsh(c @ c.T / (na * nb))
    else:
        sa = ac.T @ ac / na
        w, v = np.linalg.eigh(sa)
        root = (v * np.sqrt(np.maximum(w, 0))) @ v.T
        eig = np.linalg.eigvalsh(root @ (bc.T @ bc / nb) @ root)
    trace_sqrt = float(np.sqrt(np.maximum(eig, 0)).sum())
    tr_a, tr_b = float((ac * ac).sum() / na), float((bc * bc).sum() / nb)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + tr_a + tr_b - 2 * trace_sqrt)


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, subset: int = 100, subsets: int = 10, seed: int = 0) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel, averaged over random subsets."""
    rng = np.random.default_rng(seed)
    d = a.shape[1]
    m = min(subset, len(a), len(b))
    vals = []
    for _ in range(subsets):
        x, y = a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        vals.append((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
    return float(np.mean(vals))


def utility_summary(pairs: Iterable[tuple[np.ndarray, np.ndarray]], cfg: UtilityConfig) -> dict:
    """Mean SSIM/PSNR (and LPIPS, FID, KID when their weights are given) over (original, anonymized) pairs;
    ``skipped`` maps each metric that could not run to the reason."""
    originals, anonymized = [], []
    rows = []
    for o, a in pairs:
        rows.append(ssim_psnr(o, a))
        originals.append(o)
        anonymized.append(a)
    out: dict = {"n_pairs": len(rows), "ssim": float(np.mean([r[0] for r in rows])), "psnr": float(np.mean([r[1] for r in rows])), "skipped": {}}
    orig, anon = np.stack(originals), np.stack(anonymized)
    try:
        out["lpips"] = float(np.mean(LPIPS(cfg)(orig, anon)))
    except Unavailable as exc:
        out["skipped"]["lpips"] = str(exc)
    try:
        feats = InceptionFeatures(cfg)
        fo, fa = feats(orig), feats(anon)
        out["fid"] = frechet_distance(fo, fa)
        out["kid"] = kernel_inception_distance(fo, fa, cfg.kid_subset_size)
    except Unavailable as exc:
        out["skipped"]["fid"] = out["skipped"]["kid"] = str(exc)
    return out
