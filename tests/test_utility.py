"""Utility metrics: SSIM/PSNR known answers and torchmetrics references; LPIPS from local weight files
(random torchvision backbones written by the test, the lpips wheel's own linear layers) against the lpips
package; skipped with a reason when their weights are not given; identical-image PSNR shown one way in every
output. FID/KID: tests/test_fid_inception.py."""

import numpy as np
import pytest

from anonrisk.config.schema import UtilityConfig
from anonrisk.evaluate.utility import LPIPS, frechet_distance, kernel_inception_distance, ssim_psnr, utility_summary


def images(n=6, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_ssim_psnr_known_answers():
    x = images(1)[0]
    assert ssim_psnr(x, x) == (1.0, float("inf"))
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
    assert out["psnr"] is None and out["identical_pairs"] == 3
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


def blur(x, sigma=1.5):
    from scipy import ndimage

    return np.clip(ndimage.gaussian_filter(x.astype(float), (0, sigma, sigma, 0)), 0, 255).round().astype(np.uint8)


def smooth_images(n=4, size=48, seed=0):
    """Natural-ish images (smoothed noise plus a gradient), where SSIM windows matter."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.normal(128, 60, (n, size, size, 3)), (0, 2, 2, 0))
    return np.clip(x + np.linspace(-40, 40, size)[None, :, None, None], 0, 255).astype(np.uint8)


def test_ssim_is_the_gaussian_ssim_torchmetrics_reports():
    """Per image, against torchmetrics' StructuralSimilarityIndexMeasure (11-tap Gaussian, sigma 1.5,
    data range 255, reflect padding, mean over every pixel), in float64. Tolerance: 1e-9 absolute. v1 used
    skimage's uniform 7x7 window, which differs here by more than 0.01."""
    import torch
    from skimage.metrics import structural_similarity
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    x = smooth_images()
    noisy = np.clip(x + np.random.default_rng(1).normal(0, 25, x.shape), 0, 255).astype(np.uint8)
    ref = StructuralSimilarityIndexMeasure(data_range=255.0, reduction="none")
    for other in (blur(x), noisy, 255 - x):
        want = ref(torch.from_numpy(other).permute(0, 3, 1, 2).double(), torch.from_numpy(x).permute(0, 3, 1, 2).double())
        got = [ssim_psnr(a, b)[0] for a, b in zip(x, other)]
        assert np.allclose(got, want.numpy(), atol=1e-9), (got, want)
    uniform = [structural_similarity(a, b, channel_axis=-1, data_range=255) for a, b in zip(x, blur(x, 3))]
    assert np.abs(np.array(uniform) - [ssim_psnr(a, b)[0] for a, b in zip(x, blur(x, 3))]).max() > 0.01


def test_psnr_equals_torchmetrics():
    """Per image, against torchmetrics' PeakSignalNoiseRatio (data range 255). Tolerance: 1e-4 dB (its
    result is float32)."""
    import torch
    from torchmetrics.image import PeakSignalNoiseRatio

    x = smooth_images(3)
    for other in (blur(x), x // 2):
        for a, b in zip(x, other):
            want = PeakSignalNoiseRatio(data_range=255.0)(torch.from_numpy(b).double(), torch.from_numpy(a).double())
            assert ssim_psnr(a, b)[1] == pytest.approx(float(want), abs=1e-4)


def test_identical_psnr_is_shown_the_same_way_everywhere(tmp_path):
    """JSON null + identical_pairs; "identical" in report.md, the report card and the leaderboard; no
    utility.psnr metric in MLflow (v1: 100.0 in the tables, a fake mean when only some pairs were identical)."""
    import json

    from anonrisk.report.card import card_markdown, fmt_psnr, leaderboard, leaderboard_markdown
    from anonrisk.report.report import markdown_table
    from anonrisk.stages import write_json
    from anonrisk.tracking.mlflow_log import result_metrics

    x = smooth_images(4)
    same = utility_summary(zip(x, x), UtilityConfig())
    blurred = blur(x)
    some = utility_summary(zip(x, [x[0], x[1], blurred[2], blurred[3]]), UtilityConfig())
    assert same["psnr"] is None and same["identical_pairs"] == 4
    want = np.mean([ssim_psnr(x[i], blurred[i])[1] for i in (2, 3)])
    assert some["psnr"] == pytest.approx(want) and some["identical_pairs"] == 2
    write_json(tmp_path / "u.json", same)
    assert json.loads((tmp_path / "u.json").read_text())["psnr"] is None
    assert fmt_psnr(same) == "identical" and fmt_psnr(some) == f"{want:.1f} (2 identical)"
    metric = {"value": 0.5, "ci95": [0.4, 0.6], "chance": 0.1, "normalized": 0.44}
    protocols = {"full-ref/exclude-source": {"top1": metric, "top5": metric, "mrr": metric}}
    card = {"attacks": {"a": {"protocols": protocols}}, "utility": same}
    results = {"identity": card, "blur": {**card, "utility": some}}
    table = markdown_table(results)
    assert "| identical |" in table and f"| {want:.1f} (2 identical) |" in table and "100.0" not in table
    assert "PSNR identical" in card_markdown("identity", card, ["full-ref/exclude-source"])
    board = leaderboard_markdown(leaderboard(results))
    assert "| identical |" in board and "(2 identical)" in board
    metrics = result_metrics(card)
    assert "utility.psnr" not in metrics and metrics["utility.identical_pairs"] == 4.0
    assert result_metrics({**card, "utility": some})["utility.psnr"] == pytest.approx(want)


def test_a_failing_metric_is_skipped_and_never_takes_the_others_down(lpips_files, monkeypatch):
    """Any error inside one optional metric becomes its skipped reason; SSIM, PSNR and the rest survive."""
    import anonrisk.evaluate.utility as utility

    def broken(cfg):
        raise RuntimeError("size mismatch for fc.weight")

    monkeypatch.setattr(utility, "inception_features", broken)
    x = images(3)
    out = utility_summary(zip(x, 255 - x), lpips_files.model_copy(update={"fid_weights": "/any.pth"}))
    assert out["skipped"]["fid"] == out["skipped"]["kid"] == "FID/KID failed: RuntimeError: size mismatch for fc.weight"
    assert out["lpips"] > 0 and out["ssim"] < 1 and out["psnr"] > 0


def lpips_reference(net: str, backbone):
    """The lpips package with its own linear layers (from its wheel) and our random backbone copied in."""
    import lpips

    ref = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()
    for sl in (ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4, ref.net.slice5):
        for name, module in sl.named_children():
            module.load_state_dict(backbone.features[int(name)].state_dict())
    return ref


def lin_file(net):
    from pathlib import Path

    import lpips

    return str(Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth")


@pytest.mark.parametrize("net", ["alex", pytest.param("vgg", marks=pytest.mark.slow)])
def test_lpips_equals_the_lpips_package(net, tmp_path):
    """Our LPIPS from lpips' own .pth linear weights and a torchvision state dict (random, seeded) against
    lpips.LPIPS with the same tensors. Tolerance: 1e-5 relative + 1e-7."""
    import torch
    import torchvision

    torch.manual_seed(0)
    backbone = torchvision.models.alexnet() if net == "alex" else torchvision.models.vgg16()
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    ours = LPIPS(UtilityConfig(lpips_net=net, lpips_backbone_weights=str(tmp_path / "backbone.pth"), lpips_linear_weights=lin_file(net)))
    ref = lpips_reference(net, backbone)
    x, y = smooth_images(3, 64, seed=2), blur(smooth_images(3, 64, seed=3), 1.0)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1,
                   torch.from_numpy(y).permute(0, 3, 1, 2).float() / 127.5 - 1).flatten().numpy()
    assert want.min() > 0
    assert np.allclose(ours(x, y), want, rtol=1e-5, atol=1e-7)
