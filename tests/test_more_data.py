"""More data: Hugging Face datasets from local disk, folders without identity labels (linkage only) and
in-the-wild photos aligned by face detection in prepare."""

import json

import numpy as np
import pytest
from PIL import Image

from anonrisk.config.schema import DataConfig, RunConfig
from anonrisk.data.synthetic import render_image
from anonrisk.errors import ConfigError
from anonrisk.pipeline import Pipeline, prepare_data
from tests.real_faces import base_faces

datasets = pytest.importorskip("datasets")


def hf_dataset(identities=6, per_identity=3, size=40):
    rows = {"image": [], "celeb": []}
    for i in range(identities):
        for j in range(per_identity):
            rows["image"].append(Image.fromarray(render_image(1, i, j, size)))
            rows["celeb"].append(i)
    features = datasets.Features({"image": datasets.Image(), "celeb": datasets.ClassLabel(names=[f"person{i}" for i in range(identities)])})
    return datasets.Dataset.from_dict(rows, features=features)


def test_hf_save_to_disk_parquet_and_imagefolder_read_offline(tmp_path):
    ds = hf_dataset()
    datasets.DatasetDict({"train": ds.select(range(12)), "test": ds.select(range(12, 18))}).save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "data.parquet"))
    cfg = dict(dataset="hf", image_size=32, hf={"identity_column": "celeb"})
    _, disk = prepare_data(DataConfig(root=str(tmp_path / "disk"), split={"use_official": True}, **cfg), str(tmp_path / "runs"), progress=False)
    _, pq = prepare_data(DataConfig(root=str(tmp_path / "pq"), **cfg), str(tmp_path / "runs"), progress=False)
    assert len(disk) == len(pq) == 18
    assert {r.identity for r in disk} == {f"person{i}" for i in range(6)}
    assert {r.split for r in disk if r.identity in ("person4", "person5")} == {"test"}  # the official test split
    assert disk[0].id.startswith(("train/", "test/")) and disk[0].id.endswith(".png")
    a = next(r for r in disk if r.id == "train/000000.png")
    b = next(r for r in pq if r.id == "train/000000.png")  # the parquet builder names its one split train
    assert np.array_equal(np.asarray(Image.open(a.path)), np.asarray(Image.open(b.path)))
    for i in range(6):  # the imagefolder layout: <label>/<image>; the label is the identity
        (tmp_path / "imf" / f"person{i}").mkdir(parents=True)
        for j in range(3):
            Image.fromarray(render_image(1, i, j, 40)).save(tmp_path / "imf" / f"person{i}" / f"{j}.png")
    _, imf = prepare_data(DataConfig(root=str(tmp_path / "imf"), dataset="hf", image_size=32), str(tmp_path / "runs"), progress=False)
    assert len(imf) == 18 and {r.identity for r in imf} == {f"person{i}" for i in range(6)}
    with pytest.raises(ConfigError, match=r"data.hf.identity_column: no column 'person'.*columns: image, celeb"):
        prepare_data(DataConfig(root=str(tmp_path / "pq"), dataset="hf", hf={"identity_column": "person"}), str(tmp_path / "runs2"), progress=False)


def run_cfg(tmp, data, attacks=("edge",)):
    return RunConfig.model_validate({
        "name": "r", "runs_dir": str(tmp / "runs"), "results_dir": str(tmp / "results"), "progress": False, "data": data,
        "anonymizers": [{"name": "identity", "kind": "identity"}, {"name": "noise", "kind": "noise"}],
        "attacks": list(attacks), "evaluate": {"bootstrap": 50, "utility": {"enabled": False}}, "tracking": {"mlflow": False}})


def test_hf_on_disk_and_an_unlabeled_folder_run_end_to_end(tmp_path):
    hf_dataset().save_to_disk(str(tmp_path / "hf"))
    doc = Pipeline(run_cfg(tmp_path, {"dataset": "hf", "root": str(tmp_path / "hf"), "image_size": 32,
                                      "hf": {"identity_column": "celeb"}, "split": {"test_fraction": 0.5}})).run()
    prot = doc["results"]["identity"]["attacks"]["edge"]["protocols"]
    assert prot["full-ref/linkage"]["top1"]["value"] == 1.0 and "full-ref/exclude-source" in prot

    (tmp_path / "ffhq" / "00000").mkdir(parents=True)
    for k in range(12):
        Image.fromarray(render_image(3, k, 0, 40)).save(tmp_path / "ffhq" / "00000" / f"{k:05d}.png")
    doc = Pipeline(run_cfg(tmp_path / "u", {"dataset": "unlabeled", "root": str(tmp_path / "ffhq"), "image_size": 32,
                                            "split": {"test_fraction": 0.5}})).run()
    assert doc["data"]["labeled"] is False
    prot = doc["results"]["identity"]["attacks"]["edge"]["protocols"]
    assert list(prot) == ["full-ref/linkage"] and prot["full-ref/linkage"]["top1"]["value"] == 1.0
    assert doc["results"]["noise"]["attacks"]["edge"]["protocols"]["full-ref/linkage"]["top1"]["value"] < 0.5
    report = (tmp_path / "u" / "results" / "r" / "report.md").read_text()
    assert "no identity labels" in report and "linkage" in report
    assert "1:1 verification (linkage)" in report and "effective anonymity set (full-ref/linkage" in report


def test_wild_photos_are_aligned_and_a_photo_without_a_face_is_reported(tmp_path):
    pytest.importorskip("dlib")
    faces = base_faces(0)
    root = tmp_path / "wild"
    for name, face in (("collins", faces["collins"]), ("hopper", faces["hopper"])):
        (root / name).mkdir(parents=True)
        big = np.asarray(Image.fromarray(face).resize((260, 260)))
        Image.fromarray(big).save(root / name / "a.jpg")
        Image.fromarray(big[:, ::-1]).save(root / name / "b.jpg")
    (root / "nobody").mkdir()
    Image.fromarray(np.full((200, 200, 3), 90, np.uint8)).save(root / "nobody" / "wall.png")
    Image.fromarray(np.full((200, 200, 3), 30, np.uint8)).save(root / "nobody" / "floor.png")
    (root / "third").mkdir()
    for k in range(2):
        Image.fromarray(np.asarray(Image.fromarray(faces["hopper"]).resize((240, 240)))[:, ::-1 if k else 1]).save(root / "third" / f"{k}.png")
    stage, recs = prepare_data(DataConfig(dataset="wild", root=str(root), image_size=32, wild={"crop": 64},
                                          split={"test_fraction": 0.34}), str(tmp_path / "runs"), progress=False)
    done = json.loads((stage.path / "DONE").read_text())
    assert sorted(done["no_face"]) == ["nobody/floor.png", "nobody/wall.png"]
    assert sorted(r.id for r in recs) == ["collins/a.jpg", "collins/b.jpg", "hopper/a.jpg", "hopper/b.jpg", "third/0.png", "third/1.png"]
    for r in recs:
        assert Image.open(r.path).size == (64, 64)
    # the crop is aligned: a photo and its mirror image give (almost) mirrored crops
    a, b = (np.asarray(Image.open(next(r.path for r in recs if r.id == f"collins/{x}.jpg"))).astype(float) for x in "ab")
    assert np.abs(a - b[:, ::-1]).mean() < 20, np.abs(a - b[:, ::-1]).mean()
