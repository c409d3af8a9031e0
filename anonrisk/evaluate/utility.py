"""What anonymization costs: image utility of the anonymized test images against their originals.

- ``ssim``: the standard SSIM of Wang et al. 2004 (11-tap Gaussian window, sigma 1.5, K1 0.01, K2 0.03,
  data range 255, population covariances, mean over pixels and the three channels): the value torchmetrics'
  StructuralSimilarityIndexMeasure reports (see ``ssim``). skimage's default uniform 7x7 window with sample
  covariances, used before, gives other numbers; anonrisk no longer reports it.
- ``psnr``: dB. Identical images have infinite PSNR, so they are counted, not averaged: ``psnr`` is the mean
  over the pairs that differ (``null`` when every pair is identical) and ``identical_pairs`` the number of
  pixel-identical pairs; the report writes "identical" for ``null``.
- LPIPS when local weights are given: a torchvision AlexNet/VGG16 feature extractor plus LPIPS' linear
  layers (``evaluate.utility.lpips_backbone_weights`` and ``lpips_linear_weights``, e.g. the lpips
  package's own ``weights/v0.1/alex.pth``), as the ``lpips`` package computes it.
- FID and KID when a local Inception weights file is given (``evaluate.utility.fid_weights``): the Frechet
  distance and the unbiased cubic-kernel MMD between the 2048-d pool features of the originals and of the
  anonymized images. The paper FID needs the TF-ported FID Inception (see ``fid_inception``);
  ``fid_features`` names the network used.

A metric that cannot run (weights not given, unreadable, of another network; or any error inside it) is
skipped with the reason under ``skipped``: nothing is downloaded, and one metric never takes the others down.
"""

from __future__ import annotations

import logging
from typing import Iterable

import numpy as np

from anonrisk.config.schema import UtilityConfig
from anonrisk.errors import Unavailable

log = logging.getLogger("anonrisk")
LPIPS_LAYERS = {"alex": ([1, 4, 7, 9, 11], [64, 192, 384, 256, 256]), "vgg": ([3, 8, 15, 22, 29], [64, 128, 256, 512, 512])}


def ssim(original: np.ndarray, anonymized: np.ndarray) -> float:
    """Gaussian SSIM (Wang et al. 2004) of two uint8 (H, W, 3) images as torchmetrics computes it: 11-tap
    Gaussian window (sigma 1.5), the image mirrored at its borders ("reflect" padding), variances clipped at
    0, the SSIM map averaged over every pixel and channel. (Wang et al.'s reference code averages only the
    windows inside the image; the two differ by about 1e-3 on a 48 px image.)"""
    from scipy import ndimage

    x, y = original.astype(np.float64), anonymized.astype(np.float64)

    def window(img):  # radius int(3.5 * 1.5 + 0.5) = 5: the 11 taps; "mirror" is torch's "reflect"
        return ndimage.gaussian_filter(img, sigma=(1.5, 1.5, 0), mode="mirror", truncate=3.5)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = window(x), window(y)
    vx = np.maximum(window(x * x) - mx * mx, 0)
    vy = np.maximum(window(y * y) - my * my, 0)
    cov = window(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def psnr(original: np.ndarray, anonymized: np.ndarray) -> float:
    """PSNR in dB of two uint8 images; ``inf`` when they are identical."""
    mse = float(np.mean((original.astype(np.float64) - anonymized.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim_psnr(original: np.ndarray, anonymized: np.ndarray) -> tuple[float, float]:
    return ssim(original, anonymized), psnr(original, anonymized)


def _state(path: str, key: str) -> dict:
    from pathlib import Path

    from anonrisk.weights import read_state_dict

    p = Path(path).expanduser()
    if not p.exists():
        raise Unavailable(f"{key}: weights file not found: {p}")
    try:
        return read_state_dict(p)
    except Exception as exc:  # a truncated, foreign or pickled-object file
        raise Unavailable(f"{key}: cannot read {p} as a state dict ({type(exc).__name__}: {str(exc)[:200]})") from None


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
        with torch.device("meta"):  # no random init to pay for: every tensor comes from the file
            net = torchvision.models.alexnet() if cfg.lpips_net == "alex" else torchvision.models.vgg16()
        features = net.features
        backbone = {k.removeprefix("features."): v.float() for k, v in state.items() if k.startswith("features.")}
        expected = features.state_dict()
        missing = [k for k in expected if k not in backbone or tuple(backbone[k].shape) != tuple(expected[k].shape)]
        if missing:
            raise Unavailable(f"LPIPS: evaluate.utility.lpips_backbone_weights: not a torchvision {cfg.lpips_net} state dict "
                              f"({len(missing)} feature tensors missing or of another shape, e.g. {missing[:2]})")
        features.load_state_dict({k: backbone[k] for k in expected}, assign=True)
        self.features = features.eval()
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


def inception_features(cfg: UtilityConfig):
    """The FID/KID feature extractor of ``evaluate.utility.fid_weights`` (see ``fid_inception``)."""
    from anonrisk.evaluate.fid_inception import InceptionFeatures

    if not cfg.fid_weights:
        raise Unavailable("FID/KID: evaluate.utility.fid_weights is not set (a local FID Inception weights file, e.g. "
                          "pytorch-fid's pt_inception-2015-12-05-*.pth; never downloaded)")
    return InceptionFeatures(_state(cfg.fid_weights, "FID/KID: evaluate.utility.fid_weights"), cfg.fid_weights, cfg.fid_image_size)


def _guarded(out: dict, names: tuple[str, ...], compute) -> None:
    """Run one optional metric; any failure becomes its ``skipped`` reason, never the others' loss."""
    try:
        out.update(compute())
    except Unavailable as exc:
        reason = str(exc)
    except Exception as exc:  # noqa: BLE001 - an optional metric must not abort the stage
        log.warning("utility: %s failed", "/".join(names), exc_info=True)
        reason = f"{'/'.join(n.upper() for n in names)} failed: {type(exc).__name__}: {str(exc)[:300]}"
    else:
        return
    for name in names:
        out["skipped"][name] = reason


def utility_summary(pairs: Iterable[tuple[np.ndarray, np.ndarray]], cfg: UtilityConfig) -> dict:
    """Mean SSIM and PSNR (see the module doc), and LPIPS, FID, KID when their weights are given, over
    (original, anonymized) pairs; ``skipped`` maps each metric that could not run to the reason."""
    originals, anonymized, ssims, psnrs = [], [], [], []
    for o, a in pairs:
        ssims.append(ssim(o, a))
        psnrs.append(psnr(o, a))
        originals.append(o)
        anonymized.append(a)
    finite = [v for v in psnrs if np.isfinite(v)]
    out: dict = {"n_pairs": len(ssims), "ssim": float(np.mean(ssims)), "psnr": float(np.mean(finite)) if finite else None,
                 "identical_pairs": len(psnrs) - len(finite), "skipped": {}}
    orig, anon = np.stack(originals), np.stack(anonymized)
    _guarded(out, ("lpips",), lambda: {"lpips": float(np.mean(LPIPS(cfg)(orig, anon)))})

    def fid_kid() -> dict:
        if len(orig) < 2:
            raise Unavailable(f"FID/KID: need at least 2 image pairs, got {len(orig)}")
        feats = inception_features(cfg)
        fo, fa = feats(orig), feats(anon)
        return {"fid": frechet_distance(fo, fa), "kid": kernel_inception_distance(fo, fa, cfg.kid_subset_size),
                "fid_features": feats.kind}

    _guarded(out, ("fid", "kid"), fid_kid)
    return out
