"""Outside anonymizers: ``precomputed`` folders and ``command`` programs, on a CelebA-format dataset written here."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageFilter

from anonrisk.anonymize.external import flat_name, folder_digest, record_id
from anonrisk.config.schema import RunConfig
from anonrisk.data.io import load_image
from anonrisk.data.records import read_manifest
from anonrisk.errors import ConfigError, DataError
from anonrisk.pipeline import Pipeline
from tests.test_data import write_celeba

COPY = f"{sys.executable} -c \"import shutil,sys,pathlib; [shutil.copy(p, sys.argv[2]) for p in pathlib.Path(sys.argv[1]).iterdir()]\" {{input}} {{output}}"


def config(tmp, anonymizers, **anonymize):
    return RunConfig.model_validate({
        "runs_dir": str(tmp / "runs"), "results_dir": str(tmp / "results"), "progress": False,
        "data": {"dataset": "celeba", "root": str(tmp / "celeba"), "image_size": 32},
        "anonymizers": [{"name": a, "kind": a} if isinstance(a, str) else a for a in anonymizers], "anonymize": {"shard_size": 8, "batch_size": 4, **anonymize}, "attacks": ["edge"],
    })


@pytest.fixture
def celeba(tmp_path):
    write_celeba(tmp_path / "celeba", identities=6, per_identity=4)
    return tmp_path


def write_blurred(tmp, records, radius=2, ext=".png", size=None):
    """A blurred copy of every original, at its record's relative path (any extension), like another lab's outputs."""
    root = tmp / "blurred"
    for r in records:
        out = root / (os.path.splitext(r.id)[0] + ext)
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(r.path) as im:
            im = im.convert("RGB").filter(ImageFilter.GaussianBlur(radius))
            (im.resize(size) if size else im).save(out)
    return root


def outputs(stage):
    return {r.id: load_image(r.path) for r in read_manifest(stage / "manifest.jsonl")}


def test_flat_names_round_trip_and_are_safe():
    for rid in ("person/img.jpg", "a b/ü%.png", "../x", "000001"):
        name = flat_name(rid)
        assert record_id(name) == rid and "/" not in name and "." not in name
    assert len(flat_name("x" * 500)) < 100


def test_precomputed_reads_outputs_by_relative_path(celeba):
    pipe = Pipeline(config(celeba, [{"name": "identity", "kind": "identity"}]))
    root = write_blurred(celeba, pipe.records, ext=".webp")
    pipe = Pipeline(config(celeba, [{"name": "theirs", "kind": "precomputed", "params": {"root": str(root)}}]))
    got = outputs(pipe.anonymize("theirs"))
    assert len(got) == len(pipe.records)
    for r in pipe.records[:3]:
        want = load_image(root / (os.path.splitext(r.id)[0] + ".webp"), 32)
        assert np.array_equal(got[r.id], want)


def test_precomputed_missing_outputs_fail_by_name_or_are_quarantined(celeba):
    pipe = Pipeline(config(celeba, ["identity"]))
    root = write_blurred(celeba, pipe.records)
    gone = sorted(root.rglob("*.png"))[:2]
    for f in gone:
        f.unlink()
    (sorted(root.rglob("*.png"))[5]).write_bytes(b"not an image")
    spec = {"name": "theirs", "kind": "precomputed", "params": {"root": str(root)}}
    with pytest.raises(DataError, match=r"no usable output for 3 of 24 records .*no output file") as err:
        Pipeline(config(celeba, [spec])).anonymize("theirs")
    assert os.path.splitext(gone[0].name)[0] in str(err.value)
    cfg = config(celeba, [spec])
    cfg.data.on_bad_image = "quarantine"
    stage = Pipeline(cfg).anonymize("theirs")
    assert len(read_manifest(stage / "manifest.jsonl")) == 21
    assert len(json.loads((stage / "quarantine.json").read_text())) == 3


def test_precomputed_size_mismatch_resized_or_refused(celeba, caplog):
    pipe = Pipeline(config(celeba, ["identity"]))
    root = write_blurred(celeba, pipe.records, size=(89, 109))  # half the originals' 178x218
    spec = {"name": "theirs", "kind": "precomputed", "params": {"root": str(root), "size_mismatch": "fail"}}
    with pytest.raises(DataError, match=r"is 89x109, the original 178x218"):
        Pipeline(config(celeba, [spec])).anonymize("theirs")
    spec["params"]["size_mismatch"] = "resize"
    got = outputs(Pipeline(config(celeba, [spec])).anonymize("theirs"))
    assert "differ in size from their originals: resized" in caplog.text
    assert next(iter(got.values())).shape == (32, 32, 3)


def test_precomputed_fingerprint_follows_content_not_path(celeba):
    pipe = Pipeline(config(celeba, ["identity"]))
    root = write_blurred(celeba, pipe.records)
    spec = lambda r: [{"name": "theirs", "kind": "precomputed", "params": {"root": str(r)}}]  # noqa: E731
    first = Pipeline(config(celeba, spec(root))).plan.target("theirs").anonymize.fingerprint
    moved = root.rename(celeba / "moved")
    assert Pipeline(config(celeba, spec(moved))).plan.target("theirs").anonymize.fingerprint == first
    f = sorted(moved.rglob("*.png"))[0]
    stat = f.stat()
    Image.new("RGB", Image.open(f).size).save(f)  # same name, same size on disk may differ: content changed
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime
    assert Pipeline(config(celeba, spec(moved))).plan.target("theirs").anonymize.fingerprint != first
    assert folder_digest(moved)[1] == 24
    with pytest.raises(ConfigError, match="params.root: folder not found"):
        Pipeline(config(celeba, spec(celeba / "nowhere"))).anonymize("theirs")


def test_command_copy_equals_identity_and_logs(celeba):
    pipe = Pipeline(config(celeba, ["identity", {"name": "copy", "kind": "command", "params": {"command": COPY}}]))
    copy_stage = pipe.anonymize("copy")
    assert outputs(copy_stage).keys() == outputs(pipe.anonymize("identity")).keys()
    ident = outputs(pipe.anonymize("identity"))
    assert all(np.array_equal(v, ident[k]) for k, v in outputs(copy_stage).items())
    logs = sorted((copy_stage / "log").glob("command-*.log"))
    assert len(logs) == 3 and "exit status 0" in logs[0].read_text()


def test_command_failures_name_the_shard(celeba):
    fail_second = "if [ {shard} = 1 ]; then echo broken model >&2; exit 3; fi; cp {input}/* {output}/"
    pipe = Pipeline(config(celeba, [{"name": "cmd", "kind": "command", "params": {"command": fail_second}}]))
    with pytest.raises(DataError, match=r"shard 1: the command exited with status 3 \(broken model\)"):
        pipe.anonymize("cmd")
    stage = pipe.plan.target("cmd").anonymize.path
    assert (stage / "shards" / "00000.json").exists() and not (stage / "shards" / "00001.json").exists()
    none = Pipeline(config(celeba, [{"name": "cmd", "kind": "command", "params": {"command": "true {input} {output}"}}]))
    with pytest.raises(DataError, match=r"shard 0: the command wrote no output for 8 of 8 records"):
        none.anonymize("cmd")
    slow = Pipeline(config(celeba, [{"name": "cmd", "kind": "command", "params": {"command": "sleep 30; ls {input} {output}", "timeout_s": 0.5}}]))
    t0 = time.monotonic()
    with pytest.raises(DataError, match=r"shard 0: the command ran past params.timeout_s=0.5 s"):
        slow.anonymize("cmd")
    assert time.monotonic() - t0 < 10
    with pytest.raises(Exception, match=r"must contain \{output\}"):
        Pipeline(config(celeba, [{"name": "cmd", "kind": "command", "params": {"command": "cp {input}"}}])).anonymize("cmd")


@pytest.mark.slow  # two anonrisk processes (about 40 s on 2 busy cores)
def test_killed_command_stage_resumes_without_losing_a_finished_shard(celeba):
    """anonrisk killed while the program works on shard 1: the rerun keeps shard 0's outputs and redoes the rest."""
    gate, group = celeba / "hold", celeba / "group"
    gate.write_text("")
    # shard 0 copies; later shards note their process group and wait while the gate file exists (outside the fingerprint)
    cmd = f"if [ {{shard}} != 0 ] && [ -e {gate} ]; then echo $$ > {group}; sleep 60; fi; cp {{input}}/* {{output}}/"
    cfg = config(celeba, [{"name": "cmd", "kind": "command", "params": {"command": cmd}}])
    path = celeba / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    argv = [sys.executable, "-m", "anonrisk", "anonymize", str(path)]
    stage = Pipeline(cfg).plan.target("cmd").anonymize.path
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not (group.exists() and group.read_text().strip()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert (stage / "shards" / "00000.json").exists(), proc.stderr.read() if proc.poll() is not None else "no shard 0"
    pgid = int(group.read_text())
    os.killpg(pgid, 0)  # the program (its shell and its sleep) is running
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    def group_alive():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False

    deadline = time.time() + 10
    while group_alive() and time.time() < deadline:
        time.sleep(0.1)
    assert not group_alive(), "the program outlived anonrisk"
    first = {p: p.stat().st_mtime_ns for p in (stage / "images").rglob("*.png")}
    assert len(first) == 8
    gate.unlink()
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert {p: p.stat().st_mtime_ns for p in first} == first  # finished outputs kept, not redone
    assert len(read_manifest(stage / "manifest.jsonl")) == 24
    assert (stage / "log" / "command-00000.log").read_text().count("--- exit status") == 1  # shard 0 ran once


def test_grid_cells_plan_outside_kinds_like_builtin_ones(tmp_path):
    """In a grid (Slurm or local), outside kinds are cells like any other: checked at submit, named by their work."""
    from anonrisk.launch.grid import plan_grid

    (tmp_path / "out").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "out" / "x.png")
    grid = {"name": "outside", "base": str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"), "profile": "local",
            "fixed": {"runs_dir": str(tmp_path / "runs"), "results_dir": str(tmp_path / "results")},
            "axes": {"outside": {"cmd": {"anonymizers": [{"name": "cmd", "kind": "command", "params": {"command": "cp {input}/* {output}"}}]},
                                 "pre": {"anonymizers": [{"name": "pre", "kind": "precomputed", "params": {"root": str(tmp_path / "out")}}]}}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    a = plan_grid(path, {})
    b = plan_grid(path, {"anonymize.runner": "ray", "anonymize.ray.num_workers": 3}, check=False)
    assert len(a.stage_nodes("anonymize")) == 2 and list(a.nodes) == list(b.nodes)
    grid["axes"]["outside"]["pre"]["anonymizers"][0]["params"]["root"] = str(tmp_path / "missing")
    path.write_text(yaml.safe_dump(grid))
    with pytest.raises(ConfigError, match=r"params.root: folder not found"):
        plan_grid(path, {})
