"""Utility metrics: SSIM/PSNR known answers; LPIPS and FID/KID from local weight files (random weights
written by the test), and skipped with a reason when their weights are not given."""

import numpy as np
import pytest

from anonrisk.config.schema import UtilityConfig
from anonrisk.evaluate.utility import (
    LPIPS,
    InceptionFeatures,
    frechet_distance,
    kernel_inception_distance,
    ssim_psnr,
    utility_summary,
)


def images(n=6, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_ssim_psnr_known_answers():
    x = images(1)[0]
    assert ssim_psnr(x, x) == (1.0, 100.0)
    flat = np.full((32, 32, 3), 100, np.uint8)
    ssim, psnr = ssim_psnr(flat, flat + 10)  # MSE 100
    assert psnr == pytest.approx(20 * np.log10(255 / 10))
    assert ssim_psnr(x, 255 - x)[0] < 0 < ssim < 1


def test_frechet_and_kernel_distances_known_answers():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 4))
    b = rng.normal(size=(4000, 4)) + np.array([2.0, 0, 0, 0])
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(a, b) == pytest.approx(4.0, abs=0.25)  # |mean shift|^2 with equal covariances
    assert abs(kernel_inception_distance(a, rng.normal(size=(4000, 4)))) < 0.05 < kernel_inception_distance(a, b)
    # fewer samples than dimensions (the small-eigenproblem path) agrees with the textbook matrix square root
    from scipy import linalg

    x, y = rng.normal(size=(12, 30)), rng.normal(size=(12, 30)) * 1.5 + 0.3
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    ref = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(sx + sy - 2 * np.real(linalg.sqrtm(sx @ sy)))
    assert frechet_distance(x, y) == pytest.approx(ref, rel=1e-3)


def test_missing_weights_are_skipped_with_the_reason():
    pairs = [(x, x) for x in images(3)]
    out = utility_summary(pairs, UtilityConfig())
    assert out["ssim"] == 1.0 and "lpips" not in out and "fid" not in out
    assert "lpips_backbone_weights and lpips_linear_weights are not both set" in out["skipped"]["lpips"]
    assert "fid_weights is not set" in out["skipped"]["fid"] == out["skipped"]["kid"]
    out = utility_summary(pairs, UtilityConfig(fid_weights="/no/inception.pth", lpips_backbone_weights="/no/alex.pth",
                                               lpips_linear_weights="/no/lin.pth"))
    assert "weights file not found: /no/inception.pth" in out["skipped"]["fid"]
    assert "weights file not found: /no/alex.pth" in out["skipped"]["lpips"]


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    import torch
    import torchvision
    from safetensors.torch import save_file

    tmp = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), tmp / "alexnet.pth")
    widths = [64, 192, 384, 256, 256]
    save_file({f"lin{i}.model.1.weight": torch.rand(1, w, 1, 1) for i, w in enumerate(widths)}, str(tmp / "lin.safetensors"))
    return UtilityConfig(lpips_backbone_weights=str(tmp / "alexnet.pth"), lpips_linear_weights=str(tmp / "lin.safetensors"))


def test_lpips_from_local_weights(lpips_files):
    lp = LPIPS(lpips_files)
    x, y = images(4, seed=1), images(4, seed=2)
    dxx, dxy, dyx = lp(x, x), lp(x, y), lp(y, x)
    assert np.allclose(dxx, 0, atol=1e-6) and (dxy > 0).all() and np.allclose(dxy, dyx, rtol=1e-4)
    blurred = np.clip(x.astype(int) // 2 + 64, 0, 255).astype(np.uint8)
    assert (lp(x, blurred) > 0).all()


def test_fid_kid_from_local_inception_weights(tmp_path, lpips_files):
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    cfg = lpips_files.model_copy(update={"fid_weights": str(tmp_path / "inception.pth"), "fid_image_size": 75, "kid_subset_size": 4})
    feats = InceptionFeatures(cfg)
    a = feats(images(6, seed=3))
    assert a.shape == (6, 2048)
    x = images(6, seed=4)
    out = utility_summary(zip(x, 255 - x), cfg)
    assert out["skipped"] == {} and out["fid"] > 0 and np.isfinite(out["kid"]) and out["lpips"] > 0
    same = utility_summary(zip(x, x), cfg)
    assert same["fid"] == pytest.approx(0, abs=1e-3) and same["lpips"] == pytest.approx(0, abs=1e-6)
