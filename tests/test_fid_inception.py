"""FID/KID on the FID Inception, from every weights format users have, against the reference implementations.

No real Inception weights can be downloaded here, so the FID Inception is built from pytorch-fid's own blocks
with random (seeded) weights and BatchNorm statistics calibrated on noise (so features are not ~0), then
saved as pytorch-fid's ``pt_inception-*.pth``, as torch-fidelity's ``weights-inception-*.pth`` (the state
dict of its FeatureExtractorInceptionV3, here torchmetrics' subclass of it, after loading pytorch-fid's file)
and as ``.safetensors``. One torchmetrics network serves every test (each build costs seconds here).
References: torchmetrics' FrechetInceptionDistance / KernelInceptionDistance (``antialias=False``: the TF
1.x resize of the original FID) with ``feature_extractor_weights_path``, pytorch-fid's network and
Frechet distance, and torchvision's inception_v3 for torchvision weights.
"""

import numpy as np
import pytest
import torch

from anonrisk.config.schema import UtilityConfig
from anonrisk.evaluate.utility import frechet_distance, kernel_inception_distance, utility_summary

SIZE = 75  # network input size of most tests (the architecture's minimum): 299 px costs ~1 s an image here


def images(n, size=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def nchw(x):
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def calibrate(net, size=SIZE):
    """Random weights, and BatchNorm running statistics measured on noise, so activations stay O(1)."""
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
    net.train()
    with torch.no_grad():
        net(torch.rand(8, 3, size, size) * 2 - 1)
    return net.eval()


def pytorch_fid_network():
    """pytorch-fid's fid_inception_v3() without its download: its own blocks on torchvision's Inception3."""
    from pytorch_fid import inception as pf

    net = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b, net.Mixed_5c = pf.FIDInceptionA(192, pool_features=32), pf.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b, net.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=128), pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d, net.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=160), pf.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b, net.Mixed_7c = pf.FIDInceptionE_1(1280), pf.FIDInceptionE_2(2048)
    return net


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import torchvision
    from safetensors.torch import save_file

    tmp = tmp_path_factory.mktemp("inception")
    torch.manual_seed(0)
    pf_net = calibrate(pytorch_fid_network())
    files = {"pytorch-fid": tmp / "pt_inception-2015-12-05-6726825d.pth"}
    torch.save(pf_net.state_dict(), files["pytorch-fid"])
    fidelity = torchmetrics_inception(files["pytorch-fid"])
    files["torch-fidelity"] = tmp / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(fidelity.state_dict(), files["torch-fidelity"])
    files["safetensors"] = tmp / "fid_inception.safetensors"
    save_file({k: v.contiguous() for k, v in fidelity.state_dict().items()}, str(files["safetensors"]))
    tv_net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    aux, tv_net.AuxLogits = tv_net.AuxLogits, None  # the auxiliary head needs 299 px input; not calibrated
    calibrate(tv_net)
    tv_net.AuxLogits = aux
    files["torchvision"] = tmp / "inception_v3_google.pth"
    torch.save(tv_net.state_dict(), files["torchvision"])  # AuxLogits included, as torchvision ships it
    return {"files": files, "pytorch_fid_net": pf_net, "torchvision_net": tv_net, "torchmetrics": fidelity}


def cfg(path, size=SIZE, subset=100):
    return UtilityConfig(fid_weights=str(path), fid_image_size=size, kid_subset_size=subset)


def torchmetrics_inception(path):
    """torchmetrics' FID network (torch-fidelity's FeatureExtractorInceptionV3) from a local file, with the
    TF 1.x resize; its input size is set per test (``INPUT_IMAGE_SIZE``, the reference's own resize)."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path), antialias=False)


def reference_net(weights, size=SIZE):
    net = weights["torchmetrics"]
    net.INPUT_IMAGE_SIZE = size
    return net


def test_fid_inception_files_load_and_give_torchmetrics_features(weights):
    """Every FID Inception format loads (v1 raised RuntimeError on the 1008-class head) and gives the
    features torchmetrics computes from torch-fidelity's file. Tolerance: 1e-4 relative to the features' scale
    (float32 through ~95 layers)."""
    from anonrisk.evaluate.utility import inception_features

    x = images(2, seed=1)
    with torch.no_grad():
        want = reference_net(weights)(nchw(x)).double().numpy()
    assert want.std() > 1e-3  # the calibrated random network gives non-degenerate features
    for fmt in ("pytorch-fid", "torch-fidelity", "safetensors"):
        feats = inception_features(cfg(weights["files"][fmt]))
        assert feats.kind == "fid-inception", fmt
        got = feats(x)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), fmt


def test_fid_inception_network_equals_pytorch_fid_blocks(weights):
    """The same normalised input through our FID Inception and through pytorch-fid's blocks (its
    avg pools without padding, the last block's max pool). Tolerance: 1e-5 relative to the scale."""
    from anonrisk.evaluate.utility import inception_features

    feats = inception_features(cfg(weights["files"]["pytorch-fid"]))
    x = feats.preprocess(images(3, seed=2))
    ref = weights["pytorch_fid_net"]
    with torch.no_grad():
        fc, ref.fc = ref.fc, torch.nn.Identity()
        want = ref(x).double().numpy()
        ref.fc = fc
        got = feats.net(x).double().numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_tf1_resize_equals_torch_fidelity():
    """Tolerance 1e-3 on 0..255 pixel values (torch-fidelity's own CPU figure is bit-exact vs TF)."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    from anonrisk.evaluate.fid_inception import resize_bilinear_tf1

    x = nchw(images(2, size=37, seed=3)).float()
    for size in (75, 299, 20):
        want = interpolate_bilinear_2d_like_tensorflow1x(x, size=(size, size), align_corners=False)
        assert torch.allclose(resize_bilinear_tf1(x, size), want, atol=1e-3), size


def test_fid_and_kid_equal_torchmetrics(weights):
    """utility_summary's FID and KID against torchmetrics on the same file and images (KID with one subset
    of all images, so no random subsets). Tolerance: 1e-3 relative (FID), 1e-3 relative + 1e-6 (KID)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = images(6, seed=4), images(6, seed=5) // 2 + 60
    out = utility_summary(zip(real, fake), cfg(weights["files"]["torch-fidelity"], subset=6))
    assert "fid" not in out["skipped"] and out["fid_features"] == "fid-inception"
    net = reference_net(weights)
    fid = FrechetInceptionDistance(feature=net, normalize=False)
    kid = KernelInceptionDistance(feature=net, subsets=1, subset_size=6, normalize=False)
    for metric in (fid, kid):
        metric.update(nchw(real), real=True)
        metric.update(nchw(fake), real=False)
    want_fid = float(fid.compute())
    want_kid = float(kid.compute()[0])
    assert want_fid > 0
    assert out["fid"] == pytest.approx(want_fid, rel=1e-3)
    assert out["kid"] == pytest.approx(want_kid, rel=1e-3, abs=1e-6)


def test_frechet_distance_equals_pytorch_fid():
    """Our small-eigenproblem FID against pytorch-fid's calculate_frechet_distance (scipy sqrtm), in both of
    our code paths (fewer and more samples than dimensions). Tolerance: 1e-6 relative."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    for n, d in ((20, 64), (300, 16)):
        a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d)) * 1.3 + 0.2
        want = calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        assert frechet_distance(a, b) == pytest.approx(want, rel=1e-6)
    x, y = rng.normal(size=(30, 8)), rng.normal(size=(30, 8)) + 1
    assert kernel_inception_distance(x, y, subset=30, subsets=1) == kernel_inception_distance(x, y, subset=30, subsets=5)


@pytest.mark.slow
def test_fid_inception_at_299_px_equals_torchmetrics_default_size(weights):
    """The real input size (299 px, torchmetrics' fixed size). Tolerance as above."""
    from anonrisk.evaluate.utility import inception_features

    x = images(2, size=64, seed=6)
    with torch.no_grad():
        want = reference_net(weights, 299)(nchw(x)).double().numpy()
    got = inception_features(cfg(weights["files"]["safetensors"], size=299))(x)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_torchvision_weights_use_transform_input_semantics(weights):
    """torchvision's Inception weights expect transform_input=True on ImageNet-normalised input, which is
    the same as [-1, 1] input to the plain network: the reference below. v1 fed ImageNet-normalised input to
    a transform_input=False network. The FID says which features it used. Tolerance: 1e-4 relative."""
    import torch.nn.functional as F

    real, fake = images(4, seed=7), images(4, seed=8)
    ref = weights["torchvision_net"]

    def reference(x):
        t = F.interpolate(nchw(x).float() / 255, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
        fc, ref.fc = ref.fc, torch.nn.Identity()
        with torch.no_grad():
            out = ref(t * 2 - 1).double().numpy()
        ref.fc = fc
        return out

    want = frechet_distance(reference(real), reference(fake))
    out = utility_summary(zip(real, fake), cfg(weights["files"]["torchvision"]))
    assert out["fid"] == pytest.approx(want, rel=1e-3)
    assert out["fid_features"] == "torchvision-inception-v3"


def test_unusable_weights_are_skipped_and_ssim_psnr_lpips_survive(weights, tmp_path):
    """A wrong, truncated or foreign weights file skips FID/KID with the reason; the other metrics run
    (v1: the RuntimeError of a head mismatch, or the unpickling error, escaped and took SSIM/PSNR with it)."""
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(weights["files"]["pytorch-fid"].read_bytes()[:1000])
    headless = tmp_path / "headless.pth"
    torch.save({"fc.weight": torch.zeros(10, 2048)}, headless)
    partial = tmp_path / "partial.pth"
    state = torch.load(weights["files"]["pytorch-fid"], weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("Mixed_7c")}, partial)
    x = images(3, seed=9)
    for path, reason in ((bad, "cannot read"), (headless, "no Inception-v3 classifier head"), (partial, "is not a FID Inception")):
        out = utility_summary(zip(x, x // 2), cfg(path))
        assert reason in out["skipped"]["fid"] and out["skipped"]["kid"] == out["skipped"]["fid"], path
        assert "fid" not in out and 0 < out["ssim"] < 1 and out["psnr"] > 0
