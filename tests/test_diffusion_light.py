"""CAMOUFLaGE-Light: IP-Adapter (loaded from a local folder in the published layout) + T2I-Adapter on the
attribute encoding; random tiny weights, 64 px, 3 steps, CPU."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")

import torch  # noqa: E402

from anonrisk.anonymize import ANONYMIZERS  # noqa: E402
from anonrisk.anonymize import light_attributes as la  # noqa: E402
from anonrisk.errors import ConfigError, Unavailable  # noqa: E402
from tests.diffusion_support import one_thread, synthetic_faces  # noqa: E402,F401 (one_thread: autouse here)

SEEDS = [21, 22, 23]


@pytest.fixture(scope="module", autouse=True)
def setup_env(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    old = os.environ.get("ANONRISK_CACHE")
    os.environ["ANONRISK_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    torch.set_num_threads(before)
    if old is None:
        os.environ.pop("ANONRISK_CACHE", None)
    else:
        os.environ["ANONRISK_CACHE"] = old


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    return synthetic_faces(3)


def light(**overrides):
    params = dict(model="random:tiny", ip_adapter="random:tiny", t2i_adapter="random:tiny", steps=3, resolution=64, guidance_scale=7.5)
    a = ANONYMIZERS.build("camouflage-light", **{**params, **overrides})
    a.validate()
    a.setup("cpu")
    return a


@pytest.fixture(scope="module")
def base():
    return light()


def test_attribute_encoding_known_answer():
    attrs = np.linspace(0, 1, la.N_ATTRIBUTES)
    kps = np.array([[10.0, 12.0], [20, 12], [15, 18], [11, 24], [19, 24]])
    m = la.encode([((8, 10, 24, 30), attrs, kps)], 32, 40)
    assert m.shape == (45, 32, 40)
    np.testing.assert_allclose(m[:40, 10:30, 8:24], np.broadcast_to(attrs[:, None, None], (40, 20, 16)), atol=1e-6)
    assert m[:40, :10].max() == 0 and m[:40, :, 24:].max() == 0  # nothing outside the face box
    for k, (x, y) in enumerate(kps):  # one channel per keypoint, peaking at it
        assert m[40 + k, int(y), int(x)] == pytest.approx(1.0) and np.unravel_index(m[40 + k].argmax(), (32, 40)) == (int(y), int(x))


def test_ip_adapter_comes_from_a_local_folder_in_the_published_layout(base, faces):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    from anonrisk.anonymize.camouflage_light import IP_WEIGHTS, random_cache

    procs = base.m.unet.attn_processors
    ip = [n for n, pr in procs.items() if isinstance(pr, IPAdapterAttnProcessor2_0)]
    assert ip and sorted(ip) == sorted(n for n in procs if n.endswith("attn2.processor"))
    folders = list(random_cache("x", "tiny", 0).parent.glob("ip-adapter-tiny-*"))
    assert len(folders) == 1 and (folders[0] / "models" / IP_WEIGHTS).is_file()
    assert (folders[0] / "models/image_encoder/config.json").is_file()
    # the same folder given as a local path: the same model, the same images
    again = light(ip_adapter=str(folders[0]))
    assert np.array_equal(again(faces[:1], SEEDS[:1]), base(faces[:1], SEEDS[:1]))


def test_batched_equals_one_by_one_and_seeds_decide(base, faces):
    batched = base(faces, SEEDS).astype(int)
    single = np.concatenate([base(faces[i:i + 1], [s]) for i, s in enumerate(SEEDS)]).astype(int)
    diff = np.abs(batched - single)
    assert diff.max() <= 2 and diff.mean() < 0.05
    assert np.abs(batched - faces).mean() > 5 and not base.flagged
    assert np.array_equal(base(faces, SEEDS), batched)  # deterministic
    assert np.abs(base(faces[:1], [99]).astype(int) - batched[:1]).mean() > 1


def test_both_adapters_steer_the_image(base, faces):
    ref = base(faces[:2], SEEDS[:2]).astype(int)
    no_ip = light(ip_adapter_scale=0.0)(faces[:2], SEEDS[:2]).astype(int)
    no_t2i = light(t2i_scale=0.0)(faces[:2], SEEDS[:2]).astype(int)
    assert np.abs(ref - no_ip).mean() > 0.5 and np.abs(ref - no_t2i).mean() > 0.5
    # the IP-Adapter reads the original: another face under the same seed gives another image embedding
    st_a = base.sampler
    with torch.inference_mode():
        e = base.m.extra["image_encoder"]
        px = torch.from_numpy(faces[:2]).permute(0, 3, 1, 2).float() / 255
        px = torch.nn.functional.interpolate(px, size=(e.config.image_size,) * 2, mode="bilinear")
        emb = e(px).image_embeds
    assert not torch.allclose(emb[0], emb[1]) and st_a.extractor is not None


def test_dlib_keypoints_and_clear_errors(faces, tmp_path):
    pytest.importorskip("dlib")
    found = la.dlib_extractor(upsample=2)(faces[2])
    if found:  # dlib finds this synthetic face at 2x upsampling: 5 keypoints inside its box, attributes 0
        (x0, y0, x1, y1), attrs, kps = found[0]
        assert kps.shape == (5, 2) and attrs.sum() == 0
        assert ((kps[:, 0] >= x0 - 2) & (kps[:, 0] <= x1 + 2) & (kps[:, 1] >= y0 - 2) & (kps[:, 1] <= y1 + 2)).all()
    with pytest.raises(ConfigError, match=r"params\.ip_adapter: .* lacks models/ip-adapter_sd15\.safetensors"):
        ANONYMIZERS.build("camouflage-light", model="random:tiny", ip_adapter=str(tmp_path), t2i_adapter="random:tiny").validate()
    with pytest.raises(ConfigError, match=r"params\.t2i_adapter"):
        ANONYMIZERS.build("camouflage-light", model="random:tiny", ip_adapter="random:tiny", t2i_adapter=str(tmp_path)).validate()
    with pytest.raises(Unavailable, match=r"params\.attributes: 'facer'"):
        ANONYMIZERS.build("camouflage-light", model="random:tiny", ip_adapter="random:tiny", t2i_adapter="random:tiny",
                          attributes="facer").validate()
