"""instance-aug-faithful: the recipe's minimum-area rule and re-detection paste-back check on top of
instance-aug, and the verbatim-copy leak they add (random tiny weights, 64 px, 3 steps, CPU)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")

import torch  # noqa: E402

from anonrisk.anonymize import ANONYMIZERS  # noqa: E402
from anonrisk.anonymize.instance_aug_faithful import iou  # noqa: E402
from anonrisk.errors import ConfigError  # noqa: E402
from anonrisk.evaluate.audit import copy_fractions  # noqa: E402
from tests.diffusion_support import one_thread, synthetic_faces  # noqa: E402,F401 (one_thread: autouse here)

SEEDS = [5, 6, 7]
BOX = (10.0, 10.0, 50.0, 54.0)


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    return synthetic_faces(3)


def build(kind="instance-aug-faithful", **overrides):
    params = dict(model="random:tiny", mode="inpaint", steps=3, resolution=64, guidance_scale=[7.0, 7.5],
                  mask={"kind": "ellipse", "center": [0.5, 0.55], "radii": [0.42, 0.5], "feather": 0.03})
    if kind == "instance-aug-faithful":
        params["redetector"] = "none"
    a = ANONYMIZERS.build(kind, **{**params, **overrides})
    a.validate()
    a.setup("cpu")
    return a


@pytest.fixture(scope="module")
def plain(faces):
    """instance-aug's output (kind diffusion) for the same params and seeds."""
    return build("diffusion")(faces, SEEDS)


def test_iou_known_answers():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)


def test_redraw_kept_exactly_when_redetected_and_original_kept_when_not(faces, plain, monkeypatch):
    a = build(redetector="dlib_hog")
    monkeypatch.setattr(a, "detect", lambda image: [BOX])  # found again, same place: IoU 1
    assert np.array_equal(a(faces, SEEDS), plain)  # the check passes: exactly instance-aug's redraw
    assert a.kept_original == []
    monkeypatch.setattr(a, "detect", lambda image: [])  # never found: matched by the mask's box, no re-detection
    out = a(faces, SEEDS)
    assert a.kept_original == ["redetect"] * 3
    for f, o in zip(faces, out):
        whole, face = copy_fractions(f, o)
        assert face == 1.0 and whole > 0.98  # the person keeps its original pixels (feathered edge aside)


def test_redetection_threshold_is_iou_above_0_7(faces, plain, monkeypatch):
    a = build(redetector="dlib_hog")
    x0, y0, x1, y1 = BOX
    # shift the box found on the result so that its IoU with the original's detection is just below / above 0.7
    for shift, kept in ((8.0, False), (6.0, True)):  # IoU 0.667, 0.739
        moved = (x0 + shift, y0, x1 + shift, y1)
        assert (iou(BOX, moved) > 0.7) == kept
        monkeypatch.setattr(a, "detect", lambda image: [BOX] if any(np.array_equal(image, f) for f in faces) else [moved])
        out = a(faces[:1], SEEDS[:1])
        assert np.array_equal(out, plain[:1]) == kept
        assert np.array_equal(out[0], faces[0]) is False  # the feathered rim always differs from the original
        assert a.kept_original == ([] if kept else ["redetect"])


def test_persons_under_600_px_of_the_original_are_never_redrawn(faces):
    # a 0.1 x 0.1 radius ellipse: pi * 6.4 * 6.4 = 129 px of a 64 px image (never redrawn), 2058 px of a 256 px one
    small = {"kind": "ellipse", "center": [0.5, 0.5], "radii": [0.1, 0.1], "feather": 0.0}
    a = build(mask=small)
    out = a(faces[:2], SEEDS[:2])
    assert np.array_equal(out, faces[:2]) and a.kept_original == ["small", "small"]
    big = np.stack([np.kron(f, np.ones((4, 4, 1), np.uint8)) for f in faces[:2]])  # the same crops at 256 px
    out = a(big, SEEDS[:2])
    assert a.kept_original == [] and not np.array_equal(out, big)
    assert build(mask=small, min_person_area=100)(faces[:1], SEEDS[:1]).tolist() != faces[:1].tolist()  # the threshold is the knob


def test_tiny_preset_batched_equals_one_by_one_and_leaks_beside_instance_aug_tiny(faces):
    """The -tiny presets on the same faces and seeds (the real dlib detector, Compel prompts): with random
    weights no redraw is re-detected, so the faithful recipe copies the originals' faces verbatim, where
    instance-aug copies none (docs/diffusion.md has the table; benchmarks/faithful_leak.py makes it)."""
    from anonrisk.anonymize import build_anonymizer
    from anonrisk.config.loader import preset_dirs, resolve_anonymizer
    from anonrisk.evaluate.audit import verbatim_copy_audit

    def run(name, imgs, seeds):
        return build_anonymizer(resolve_anonymizer(name, preset_dirs(None), 0))(imgs, seeds)

    faithful = build_anonymizer(resolve_anonymizer("instance-aug-faithful-tiny", preset_dirs(None), 0))
    batched = faithful(faces, SEEDS)
    single = np.concatenate([faithful(faces[i:i + 1], [s]) for i, s in enumerate(SEEDS)])
    assert np.abs(batched.astype(int) - single).max() <= 2
    leak = verbatim_copy_audit(zip(faces, batched))
    base = verbatim_copy_audit(zip(faces, run("instance-aug-tiny", faces, SEEDS)))
    assert leak["face"]["mean"] == 1.0 and leak["pasted_faces"] == 1.0
    assert base["face"]["mean"] == 0.0 and base["image"]["mean"] < 0.3


def test_config_errors():
    with pytest.raises(ConfigError, match=r"params\.redetector_weights"):
        ANONYMIZERS.build("instance-aug-faithful", model="random:tiny", redetector="haar", redetector_weights="/nope.xml").validate()
    with pytest.raises(ConfigError, match=r"params\.paste_back"):
        ANONYMIZERS.build("instance-aug-faithful", model="random:tiny", paste_back=False).validate()
