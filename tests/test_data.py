"""Dataset adapters on small fixtures written in each dataset's real on-disk format."""

import numpy as np
import pytest
from PIL import Image

from anonrisk.config.schema import DataConfig
from anonrisk.pipeline import prepare_data as prepare
from anonrisk.data.synthetic import render_image
from anonrisk.errors import DataError


def write_celeba(root, identities=6, per_identity=4, partition=True):
    (root / "img_align_celeba").mkdir(parents=True)
    lines, parts = [], []
    n = 0
    for i in range(identities):
        for j in range(per_identity):
            n += 1
            name = f"{n:06d}.jpg"
            Image.fromarray(render_image(1, i, j, 48)).resize((178, 218)).save(root / "img_align_celeba" / name)
            lines.append(f"{name} {i + 1}")
            parts.append(f"{name} {0 if i < identities - 2 else 2}")
    (root / "identity_CelebA.txt").write_text("\n".join(lines) + "\n")
    if partition:
        (root / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    return root


def write_lfw(root, people=("Ada_Lovelace", "Alan_Turing", "Grace_Hopper", "Solo_Person")):
    for k, person in enumerate(people):
        (root / "lfw" / person).mkdir(parents=True)
        for j in range(1 if person.startswith("Solo") else 3):
            Image.fromarray(render_image(2, k, j, 40)).save(root / "lfw" / person / f"{person}_{j + 1:04d}.jpg")
    return root


def cfg(**kw):
    return DataConfig(image_size=32, **kw)


def test_celeba_official_layout_and_official_split(tmp_path):
    root = write_celeba(tmp_path / "celeba")
    stage, recs = prepare(cfg(dataset="celeba", root=str(root), split={"use_official": True}), str(tmp_path / "runs"), progress=False)
    assert stage.is_done() and len(recs) == 24
    assert {r.split for r in recs if r.identity in ("5", "6")} == {"test"}
    assert {r.split for r in recs if r.identity == "1"} == {"train"}


def test_splits_are_identity_disjoint(tmp_path):
    root = write_celeba(tmp_path / "celeba", identities=12)
    _, recs = prepare(cfg(dataset="celeba", root=str(root), split={"test_fraction": 0.3, "aux_fraction": 0.2}), str(tmp_path / "runs"), progress=False)
    by_split = {s: {r.identity for r in recs if r.split == s} for s in ("train", "test", "aux")}
    assert all(by_split.values())
    assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["aux"]) and not (by_split["test"] & by_split["aux"])


def test_lfw_folders_drop_identities_with_one_image(tmp_path):
    root = write_lfw(tmp_path)
    _, recs = prepare(cfg(dataset="lfw", root=str(root)), str(tmp_path / "runs"), progress=False)
    assert {r.identity for r in recs} == {"Ada_Lovelace", "Alan_Turing", "Grace_Hopper"}
    assert len({r.id for r in recs}) == 9


def test_missing_identity_file_is_named(tmp_path):
    root = write_celeba(tmp_path / "celeba")
    (root / "identity_CelebA.txt").unlink()
    with pytest.raises(DataError, match="identity file not found: .*identity_CelebA.txt"):
        prepare(cfg(dataset="celeba", root=str(root)), str(tmp_path / "runs"), progress=False)


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no usable images"):
        prepare(cfg(dataset="folder", root=str(tmp_path / "empty")), str(tmp_path / "runs"), progress=False)


def test_corrupt_image_fails_by_name_or_is_quarantined(tmp_path):
    root = write_celeba(tmp_path / "celeba")
    bad = root / "img_align_celeba" / "000003.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    with pytest.raises(DataError, match=r"bad image .*000003.jpg.*on_bad_image=quarantine"):
        prepare(cfg(dataset="celeba", root=str(root)), str(tmp_path / "runs"), progress=False)
    stage, recs = prepare(cfg(dataset="celeba", root=str(root), on_bad_image="quarantine"), str(tmp_path / "runs"), progress=False)
    assert len(recs) == 23 and "img_align_celeba/000003.jpg" not in {r.id for r in recs}
    import json

    assert [q["id"] for q in json.loads((stage / "quarantine.json").read_text())] == ["img_align_celeba/000003.jpg"]


def test_synthetic_is_deterministic_and_identity_is_geometry():
    a, b = render_image(0, 3, 1, 64), render_image(0, 3, 1, 64)
    assert np.array_equal(a, b)
    assert not np.array_equal(render_image(0, 3, 2, 64), a)  # per-image nuisance
