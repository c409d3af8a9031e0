"""Pretrained backbones for every train.input: a local 3-channel resnet18 checkpoint (random seeded weights,
as .safetensors and as .pth) starts an rgb+edges (4-channel) and an edges (1-channel) attack, its stem
adapted as timm adapts its own pretrained weights, and the backbone sees its pretrained mean/std."""

import numpy as np
import pytest
import torch

from anonrisk.attack.model import MEAN, STD, Encoder
from anonrisk.config.schema import TrainConfig
from anonrisk.errors import ConfigError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 3-channel resnet18 with its 1000-class classifier, in both file formats."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(7)
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    d = tmp_path_factory.mktemp("ckpt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "resnet18.safetensors"))
    torch.save(state, d / "resnet18.pth")
    return state, {"safetensors": d / "resnet18.safetensors", "pth": d / "resnet18.pth"}


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_the_rgb_stem_is_carried_over_into_every_input(checkpoint, fmt):
    state, files = checkpoint
    rgb = state["conv1.weight"]
    for input, expected in (("rgb+edges", torch.cat([rgb, rgb[:, :1]], 1) * 3 / 4),  # timm's adapt_input_conv
                            ("edges", rgb.sum(1, keepdim=True)),
                            ("rgb", rgb)):
        enc = Encoder("resnet18", 16, pretrained=str(files[fmt]), input=input)
        got = enc.backbone.state_dict()
        assert torch.allclose(got["conv1.weight"], expected, atol=1e-7), input
        assert all(torch.equal(got[k], state[k]) for k in got if k != "conv1.weight")  # everything else as saved
        assert "fc.weight" not in got  # the classifier is dropped
        assert enc.input_mean_std() == (IMAGENET_MEAN, IMAGENET_STD)


def test_pretrained_backbones_see_their_pretrained_normalisation_random_init_the_fixed_one(checkpoint):
    _, files = checkpoint
    x_fixed = (torch.rand(2, 3, 32, 32) - MEAN) / STD  # what Encoder.preprocess hands in
    enc = Encoder("resnet18", 16, pretrained=str(files["safetensors"]), input="rgb").eval()
    seen = {}
    enc.backbone.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    enc(x_fixed)
    raw = x_fixed * STD + MEAN
    want = (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(seen["x"], want, atol=1e-5)

    rand = Encoder("resnet18", 16, input="rgb+edges").eval()  # random init: exactly the fixed normalisation
    assert rand.input_mean_std() == ((MEAN,) * 3, (STD,) * 3) and not rand.renormalize
    rand.backbone.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    rand(x_fixed)
    assert torch.equal(seen["x"][:, :3], x_fixed)


def _pairs(root, identities=4, per_identity=2, size=32):
    from PIL import Image

    from anonrisk.data.records import FaceRecord

    rng = np.random.default_rng(0)
    anon, orig = [], []
    for i in range(identities):
        for j in range(per_identity):
            for kind, out in (("anon", anon), ("orig", orig)):
                path = root / kind / f"{i}_{j}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
                out.append(FaceRecord(f"p{i}/{j}", f"p{i}", str(path), "train"))
    return anon, orig


@pytest.mark.parametrize("input", ["rgb+edges", "edges"])
def test_a_pretrained_attack_trains_and_its_encoder_reloads_with_the_same_normalisation(checkpoint, input, tmp_path):
    from anonrisk.attack.train import load_encoder, train_attack
    from anonrisk.attack.embed import embed_records
    from anonrisk.stages import StageDir

    _, files = checkpoint
    anon, orig = _pairs(tmp_path)
    cfg = TrainConfig(backbone="resnet18", pretrained=str(files["pth"]), input=input, embed_dim=16, batch_size=4, steps=2,
                       augment=False)
    weights = train_attack(cfg, anon, orig, 32, StageDir(str(tmp_path / "runs"), "train", input.replace("+", "_")), progress=False)
    trained = load_encoder(cfg, weights)
    assert trained.renormalize and trained.input_mean_std() == (IMAGENET_MEAN, IMAGENET_STD)
    fresh = Encoder("resnet18", 16, input=input, pretrained_normalization=True)  # rebuilt without the checkpoint
    fresh.load_state_dict(trained.state_dict())
    e1, e2 = embed_records(trained, orig, 32), embed_records(fresh.eval(), orig, 32)
    assert torch.allclose(e1, e2) and torch.isfinite(e1).all()


def test_a_checkpoint_that_does_not_fit_is_refused_naming_the_file(checkpoint, tmp_path):
    state, files = checkpoint
    with pytest.raises(ConfigError, match=r"train.pretrained: .*resnet18.safetensors does not fit resnet34"):
        Encoder("resnet34", 16, pretrained=str(files["safetensors"]), input="rgb+edges")
    from safetensors.torch import save_file

    partial = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("layer4")}, str(partial))
    with pytest.raises(ConfigError, match=r"does not fit resnet18: \d+ of its \d+ tensors are missing \(layer4"):
        Encoder("resnet18", 16, pretrained=str(partial))
