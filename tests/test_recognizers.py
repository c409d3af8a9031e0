"""Off-the-shelf recognizers: dlib on real faces (offline, from face-recognition-models), ArcFace and FaceNet
from local weight files (random weights written by the test), and clear reasons when something is missing."""

import numpy as np
import pytest

from anonrisk.errors import Unavailable
from anonrisk.evaluate.recognizers import build_recognizer
from tests.real_faces import build_real_faces


@pytest.mark.slow
def test_dlib_reidentifies_identity_near_perfectly_on_real_faces(tmp_path):
    """16 real identities (Collins, Hopper, 14 LFW crops), 3 constructed views each; see tests/real_faces.py."""
    from anonrisk.config import load_config
    from anonrisk.pipeline import Pipeline

    root = build_real_faces(tmp_path / "faces", n_lfw=14, variants=3)
    cfg = load_config(None, [
        f"runs_dir={tmp_path}/runs", f"results_dir={tmp_path}/results", "progress=false", "tracking.mlflow=false", "name=faces",
        "data.dataset=folder", f"data.root={root}", "data.image_size=150", "data.split.test_fraction=0.9",
        "anonymizers=[identity]", "attacks=[{name: dlib, kind: recognizer, params: {model: dlib, upsample: 0}}]",
        "evaluate.bootstrap=200", "evaluate.few_ref_k=2"])
    doc = Pipeline(cfg).run()
    p = doc["results"]["identity"]["attacks"]["dlib"]["protocols"]
    full, linkage = p["full-ref/exclude-source"]["top1"], p["full-ref/linkage"]["top1"]
    assert p["full-ref/exclude-source"]["n_identities"] == 14
    assert full["value"] >= 0.9 and linkage["value"] == 1.0, (full, linkage)
    assert full["ci95"][0] > full["chance_ci95"][1]


def test_dlib_descriptors_are_stable_and_separate_people():
    from tests.real_faces import base_faces, view

    rec = build_recognizer({"model": "dlib"})
    rec.check()
    faces = base_faces(0)
    rng = np.random.default_rng(0)
    imgs = np.stack([view(faces["collins"], rng), view(faces["collins"], rng), view(faces["hopper"], rng)])
    d = -rec.similarity(rec.embed(imgs), rec.embed(imgs))
    assert d.shape == (3, 3) and np.allclose(np.diag(d), 0, atol=1e-3)
    assert d[0, 1] < 0.45 < 0.6 < d[0, 2]  # dlib's same-person line is 0.6


def test_euclidean_similarity_of_a_descriptor_to_itself_is_zero():
    """dlib's metric is a distance: float32 |a|^2 + |b|^2 - 2ab cancels to ~1e-7 on equal rows and the square
    root turns that into ~1e-3, enough to fail the real-face test above on some CPUs. Computed in float64 the
    self-distance is below 1e-6 (tolerance: float64 rounding of 128-d unit-scale vectors, times the root)."""
    rec = build_recognizer({"model": "dlib"})
    x = np.random.default_rng(0).normal(0, 0.09, (64, 128)).astype(np.float32)  # dlib-like scale (|x| ~ 1)
    d = -rec.similarity(x, x)
    assert np.abs(np.diag(d)).max() < 1e-6, np.abs(np.diag(d)).max()
    brute = np.sqrt(((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1))  # no cancellation
    np.testing.assert_allclose(d, brute, atol=1e-6)


def test_dlib_missing_models_is_unavailable_with_the_path(tmp_path):
    rec = build_recognizer({"model": "dlib", "models_dir": str(tmp_path / "nowhere")})
    with pytest.raises(Unavailable, match=r"weights not found in .*nowhere.*dlib_face_recognition_resnet_model_v1.dat"):
        rec.check()


@pytest.mark.parametrize("model,arch,size", [("arcface", "iresnet18", 112), ("facenet", None, 160)])
def test_torch_recognizers_load_local_weights(tmp_path, model, arch, size):
    import torch
    from safetensors.torch import save_file

    from anonrisk.evaluate.face_nets import IRESNET_LAYERS, InceptionResnetV1, IResNet

    torch.manual_seed(0)
    net = IResNet(IRESNET_LAYERS[arch]) if model == "arcface" else InceptionResnetV1()
    path = tmp_path / f"{model}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    params = {"model": model, "weights": str(path), **({"arch": arch} if arch else {})}
    rec = build_recognizer(params)
    rec.check()
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    e = rec.embed(imgs)
    assert e.shape == (3, 512) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert np.allclose(e, rec.embed(imgs), atol=1e-6)  # eval mode: deterministic
    # the loaded network is the saved one: same output as the original module at its input size
    x = torch.nn.functional.interpolate(torch.from_numpy(imgs).permute(0, 3, 1, 2).float(), size=(size, size), mode="bilinear",
                                        align_corners=False, antialias=True)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(net.eval()(rec.normalize(x)), dim=1).numpy()
    assert np.allclose(e, ref, atol=1e-4)
    torch.save(net.state_dict(), tmp_path / f"{model}.pt")  # a torch.load(weights_only=True) file works too
    assert np.allclose(build_recognizer({**params, "weights": str(tmp_path / f"{model}.pt")}).embed(imgs), e, atol=1e-5)


def test_torch_recognizers_explain_missing_or_wrong_weights(tmp_path):
    import torch

    from anonrisk.errors import ConfigError
    from anonrisk.evaluate.face_nets import IRESNET_LAYERS, IResNet

    with pytest.raises(Unavailable, match=r"params.weights is not set; its weights are never downloaded"):
        build_recognizer({"model": "arcface"}).check()
    with pytest.raises(Unavailable, match="weights file not found: /no/such.pt"):
        build_recognizer({"model": "facenet", "weights": "/no/such.pt"}).check()
    torch.save(IResNet(IRESNET_LAYERS["iresnet18"]).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(Unavailable, match=r"r18.pt does not fit FaceNetRecognizer"):
        build_recognizer({"model": "facenet", "weights": str(tmp_path / "r18.pt")}).check()
    with pytest.raises(ConfigError, match=r"params.arch: 'iresnet7'"):
        build_recognizer({"model": "arcface", "arch": "iresnet7"})
    with pytest.raises(ConfigError, match=r"unknown recognizer 'vggface'; known: arcface, dlib, facenet"):
        build_recognizer({"model": "vggface"})
