"""Results say how they were made (an ``environment`` block, ``made_by`` in every DONE) and follow the
user's umask."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

from anonrisk.environment import environment, git_state, package_versions
from anonrisk.stages import StageDir, atomic_path, read_json, write_json

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a" / "x.json", {"a": 1})
        with atomic_path(tmp_path / "b.txt") as tmp:
            tmp.write_text("b")
    finally:
        os.umask(old)
    for p in (tmp_path / "a" / "x.json", tmp_path / "b.txt"):
        assert stat.S_IMODE(p.stat().st_mode) == mode, (p, oct(p.stat().st_mode))
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary file left behind


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "c.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_environment_names_the_program_and_its_libraries():
    import torch

    env = environment({"x": {"anonymize": {}}})
    assert env["packages"]["torch"] == torch.__version__ and env["packages"]["diffusers"]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert env["git"]["commit"] == head.stdout.strip() and isinstance(env["git"]["dirty"], bool)
    assert env["host"]["cpus"] >= 1 and env["host"]["cpu"] and env["stages"] == {"x": {"anonymize": {}}}
    assert set(package_versions()) >= {"torch", "diffusers", "transformers", "timm", "deepspeed", "ray", "mlflow"}


def test_git_state_outside_a_checkout_is_null(tmp_path):
    assert git_state(str(tmp_path)) == {"commit": None, "dirty": None}


def test_done_records_the_program_that_made_the_stage(tmp_path):
    stage = StageDir(tmp_path, "prepare", "abc").begin({})
    stage.mark_done({"records": 3})
    done = read_json(stage / "DONE")
    assert done["records"] == 3 and done["made_by"]["anonrisk"] and "commit" in done["made_by"]
