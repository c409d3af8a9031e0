"""Issue 15: every record unique and traceable, stages that notice changed inputs, one writer per stage, a
clear one-line error (exit 2) for every expected failure. Tiny real data in the datasets' on-disk formats."""

import json
import multiprocessing as mp
import os
import shutil
import signal
import time

import numpy as np
import pytest
from PIL import Image

from anonrisk.config.schema import DataConfig
from anonrisk.data.synthetic import render_image
from anonrisk.errors import ConfigError, DataError
from anonrisk.pipeline import prepare_data
from anonrisk.stages import StageDir, read_json
from tests.test_data import write_celeba, write_lfw


def cfg(**kw):
    return DataConfig(image_size=32, **kw)


def cli(*argv):
    from anonrisk.cli import main

    return main([str(a) for a in argv])


# ---- 1. record ids: relative POSIX paths with extension; a clash names both files ------------------
def test_ids_are_relative_paths_with_extension(tmp_path):
    root = write_lfw(tmp_path / "lfw_root")
    img = Image.open(root / "lfw" / "Ada_Lovelace" / "Ada_Lovelace_0001.jpg")
    img.save(root / "lfw" / "Ada_Lovelace" / "Ada_Lovelace_0001.png")  # same stem, another file
    _, recs = prepare_data(cfg(dataset="lfw", root=str(root)), str(tmp_path / "runs"), progress=False)
    ids = {r.id for r in recs}
    assert {"lfw/Ada_Lovelace/Ada_Lovelace_0001.jpg", "lfw/Ada_Lovelace/Ada_Lovelace_0001.png"} <= ids and len(ids) == len(recs) == 10


def test_an_id_clash_names_both_files(tmp_path):
    root = write_celeba(tmp_path / "celeba", identities=4, per_identity=3, partition=False)
    ident = root / "identity_CelebA.txt"
    ident.write_text(ident.read_text() + "000001.jpg 3\n")  # the same image listed twice
    with pytest.raises(DataError, match=r"two images have the record id 'img_align_celeba/000001.jpg': .*000001.jpg and .*000001.jpg"):
        prepare_data(cfg(dataset="celeba", root=str(root)), str(tmp_path / "runs"), progress=False)


# ---- 2. content fingerprints ---------------------------------------------------------------------
def test_data_fingerprint_follows_the_files(tmp_path):
    from anonrisk.plan import plan_data

    root = write_celeba(tmp_path / "celeba", identities=4, per_identity=3, partition=False)
    fp = lambda r, mode="stat": plan_data(cfg(dataset="celeba", root=str(r), fingerprint=mode), str(tmp_path / "runs"))[1].fingerprint  # noqa: E731
    before, hashed = fp(root), fp(root, "sha256")
    img = root / "img_align_celeba" / "000002.jpg"
    Image.fromarray(render_image(9, 9, 9, 48)).save(img)  # edited in place
    assert fp(root) != before and fp(root, "sha256") != hashed
    edited, edited_hashed = fp(root), fp(root, "sha256")
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, copy_function=shutil.copy)  # new mtimes, same bytes
    assert fp(copy, "sha256") == edited_hashed and fp(copy) != edited
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)  # copy2 keeps mtimes: the same dataset elsewhere
    assert fp(moved) == edited


# ---- 3. manifests relative to their stage / dataset root; a moved runs_dir reads its own files ------
def test_manifests_are_relative_and_survive_a_move(tmp_path):
    from anonrisk.data.records import read_manifest

    root = write_lfw(tmp_path / "data")
    stage, recs = prepare_data(cfg(dataset="lfw", root=str(root)), str(tmp_path / "runs"), progress=False)
    lines = [json.loads(x) for x in (stage / "manifest.jsonl").read_text().splitlines()]
    assert all(not os.path.isabs(x["path"]) and x["root"] == "data" and x["size"] > 0 and len(x["sha256"]) == 64 for x in lines)
    shutil.move(str(tmp_path / "data"), str(tmp_path / "data2"))
    moved = read_manifest(stage / "manifest.jsonl", tmp_path / "data2")
    assert [r.path for r in moved] == [r.path.replace(str(tmp_path / "data"), str(tmp_path / "data2")) for r in recs]


# ---- 4. sizes and hashes checked when a finished stage is reused; anonrisk verify ------------------
def test_a_changed_stage_is_named_not_reused(tmp_path):
    stage = StageDir(tmp_path, "evaluate", "abc").begin({})
    (stage / "metrics.json").write_text('{"top1": 0.5}')
    stage.mark_done({}, outputs=["metrics.json"])
    assert stage.reuse(["metrics.json"])
    (stage / "metrics.json").write_text('{"top1": 0.9}')  # same size, other numbers
    with pytest.raises(DataError, match=r"metrics.json: content differs .* DONE"):
        stage.reuse(["metrics.json"])
    (stage / "metrics.json").unlink()  # a deleted metrics.json next to DONE
    with pytest.raises(DataError, match=r"metrics.json: missing, though the evaluate stage is DONE"):
        stage.reuse(["metrics.json"])


def test_deleted_metrics_next_to_done_is_a_clear_error(tmp_path):
    """Before: FileNotFoundError from read_json (a traceback); the evaluate stage of today's code."""
    from anonrisk.config.schema import EvaluateConfig
    from anonrisk.evaluate.evaluate import evaluate_similarity

    stage = StageDir(tmp_path, "evaluate", "x").begin({})
    stage.mark_done({})
    with pytest.raises(DataError, match=r"metrics.json: missing"):
        evaluate_similarity(None, [], [], EvaluateConfig(), stage, {})


def test_verify_finds_a_changed_image(tmp_path, capsys):
    root = write_lfw(tmp_path / "data")
    stage, recs = prepare_data(cfg(dataset="lfw", root=str(root)), str(tmp_path / "runs"), progress=False)
    assert cli("verify", "--runs-dir", tmp_path / "runs") == 0 and "ok" in capsys.readouterr().out
    victim = recs[0].path
    data = bytearray(open(victim, "rb").read())
    data[-3] ^= 0xFF  # one flipped byte: same size, so only the hash sees it
    open(victim, "wb").write(bytes(data))
    assert cli("verify", "--runs-dir", tmp_path / "runs") == 1
    out = capsys.readouterr().out
    assert "CHANGED" in out and f"{victim} (record {recs[0].id}): content differs" in out


# ---- 5. one lock per stage directory ----------------------------------------------------------------
def _hold(path, started, release):
    stage = StageDir(path, "train", "fp")
    with stage.lock():
        started.set()
        release.wait(30)
        stage.begin({})
        (stage / "encoder.safetensors").write_bytes(b"w")
        stage.mark_done({}, outputs=["encoder.safetensors"])


def test_a_second_process_waits_for_the_stage_then_reuses_it(tmp_path):
    ctx = mp.get_context("fork")
    started, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(tmp_path, started, release))
    p.start()
    assert started.wait(30)
    stage = StageDir(tmp_path, "train", "fp")
    holder = (tmp_path / ".locks" / "train" / "fp.lock").read_text()
    assert f"pid {p.pid}" in holder
    threading_release = __import__("threading").Timer(0.5, release.set)
    threading_release.start()
    t0 = time.monotonic()
    with stage.lock():  # waits for the other process
        waited = time.monotonic() - t0
        assert stage.reuse(["encoder.safetensors"])
    p.join(30)
    assert waited >= 0.4 and p.exitcode == 0


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    ctx = mp.get_context("fork")
    started, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(tmp_path, started, release))
    p.start()
    assert started.wait(30)
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    stage = StageDir(tmp_path, "train", "fp")
    with stage.lock():
        assert not stage.is_done()


# ---- 6. path safety --------------------------------------------------------------------------------
def test_dotdot_in_identity_file_is_refused(tmp_path):
    root = write_celeba(tmp_path / "celeba", identities=4, per_identity=3, partition=False)
    shutil.copy(root / "img_align_celeba" / "000001.jpg", tmp_path / "secret.jpg")
    ident = root / "identity_CelebA.txt"
    ident.write_text(ident.read_text() + "../../secret.jpg 1\n")
    with pytest.raises(DataError, match=r"identity_CelebA.txt:13: path '../../secret.jpg' leads outside the dataset root"):
        prepare_data(cfg(dataset="celeba", root=str(root)), str(tmp_path / "runs"), progress=False)


@pytest.mark.parametrize("name", ["../../x", "a/b", ".hidden", ""])
def test_run_name_must_be_a_plain_folder(name):
    from anonrisk.config.loader import validate

    with pytest.raises(ConfigError, match="name: must be a plain folder name"):
        validate({"name": name})


# ---- 7. 16-bit PNGs and decompression bombs --------------------------------------------------------
def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    from anonrisk.data.io import load_image

    a = np.full((8, 8), 128 * 257, np.uint16)
    a[0, 0] = 65535
    Image.fromarray(a).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    img = load_image(tmp_path / "deep.png")
    assert img.shape == (8, 8, 3) and img[1, 1].tolist() == [128, 128, 128] and img[0, 0].tolist() == [255, 255, 255]


def test_decompression_bomb_fails_by_name_or_is_quarantined(tmp_path, monkeypatch):
    root = write_celeba(tmp_path / "celeba", identities=4, per_identity=3, partition=False)
    Image.fromarray(np.zeros((400, 400, 3), np.uint8)).save(root / "img_align_celeba" / "000005.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60000)  # 160000 px > 2x the limit: Pillow refuses it
    with pytest.raises(DataError, match=r"000005.jpg.*decompression bomb.*on_bad_image=quarantine"):
        prepare_data(cfg(dataset="celeba", root=str(root)), str(tmp_path / "runs"), progress=False)
    stage, recs = prepare_data(cfg(dataset="celeba", root=str(root), on_bad_image="quarantine"), str(tmp_path / "runs"), progress=False)
    assert [q["id"] for q in read_json(stage / "quarantine.json")] == ["img_align_celeba/000005.jpg"] and len(recs) == 11


# ---- 8. prepare reports identities with one image ---------------------------------------------------
def test_prepare_reports_dropped_identities(tmp_path):
    stage, _ = prepare_data(cfg(dataset="lfw", root=str(write_lfw(tmp_path / "d"))), str(tmp_path / "runs"), progress=False)
    dropped = read_json(stage / "DONE")["dropped_identities"]
    assert dropped["count"] == 1 and dropped["images"] == 1 and dropped["first"] == ["Solo_Person"]
