"""Issue 15, continued: clear one-line errors and exit codes (config files, validate, training, a full disk),
results never silently replaced, stale grid status, the MLflow store's lock."""

import json
import multiprocessing as mp
import os
import signal

import pytest
import yaml

from anonrisk.errors import ConfigError, DataError
from anonrisk.pipeline import prepare_data
from anonrisk.stages import StageDir, read_json
from tests.test_data import write_lfw
from tests.test_reliability import cfg, cli


# ---- 9. config files: clear one-line errors, exit 2 -------------------------------------------------
@pytest.mark.parametrize("content,message", [
    (b"", "the config file is empty"),
    (b"name: caf\xe9\n", "not UTF-8 text"),
    (b"train: {steps: true}\n", "train.steps: expected a number, not a boolean"),
    (b"name: ../../x\n", "name: must be a plain folder name"),
    (None, "is a directory, not a config file"),
])
def test_bad_config_files_exit_2_with_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "c.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    assert cli("validate", path) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_value_error_from_a_kinds_params_is_a_config_error():
    from pydantic import BaseModel

    from anonrisk.registry import Kind, Registry

    class P(BaseModel):
        arch: str = "x"

    reg = Registry("anonymizer")

    @reg.register("picky")
    class Picky(Kind):
        Params = P

        def __init__(self, params, key=""):
            super().__init__(params, key)
            raise ValueError(f"unknown architecture {params.arch!r}")

    with pytest.raises(ConfigError, match=r"anonymizers\[0\] \(p\): anonymizer 'picky': unknown architecture 'x'"):
        reg.build("picky", "anonymizers[0] (p)")


# ---- 10. anonrisk validate catches what run would hit, without doing the work ------------------------
TINY = {"name": "tiny", "progress": False, "data": {"dataset": "synthetic", "image_size": 32,
        "synthetic": {"identities": 12, "images_per_identity": 3}, "split": {"test_fraction": 0.34}},
        "anonymizers": ["identity"], "attacks": ["contrastive"],
        "train": {"backbone": "test_convnext", "batch_size": 8, "per_identity": 2, "steps": 2, "embed_dim": 8},
        "tracking": {"mlflow": False}}


@pytest.mark.parametrize("overrides,message", [
    (("attacks=[surrogate]",), "surrogate attacker needs its own auxiliary identities"),
    (("train.backbone=resnet_51",), "train.backbone 'resnet_51' is not a timm model"),
    (("train.batch_size=64",), "train.batch_size=64 needs 32 distinct identities per batch (per_identity=2) but training has 8"),
    (("data.dataset=celeba", "data.root=/nonexistent/celeba"), "data.root '/nonexistent/celeba' is not a directory"),
    (("attacks=[{name: e, kind: edge, params: {sigmaa: 1}}]",), "attack 'edge': params.sigmaa: unknown key"),
])
def test_validate_finds_it_without_doing_the_work(tmp_path, capsys, overrides, message):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "runs_dir": str(tmp_path / "runs"), "results_dir": str(tmp_path / "results")}))
    assert cli("validate", path, *overrides) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "prepare").exists()  # nothing prepared, rendered or trained


# ---- 11. training: refused without a stage dir, checkpoint fallback, torn log line, preemption ---------
def _train_setup(tmp_path, **train):
    from anonrisk.config.schema import TrainConfig

    _, recs = prepare_data(cfg(dataset="synthetic", synthetic={"identities": 9, "images_per_identity": 2}, split={"test_fraction": 0.34}),
                           str(tmp_path / "runs"), progress=False)
    tc = TrainConfig(**{"backbone": "test_convnext", "batch_size": 4, "per_identity": 2, "steps": 4, "embed_dim": 8,
                        "checkpoint_every": 2, "augment": False, "input": "rgb", **train})
    return tc, recs, StageDir(tmp_path / "runs", "train", "t")


def test_a_refused_training_leaves_no_stage_dir(tmp_path):
    from anonrisk.attack.train import train_attack

    tc, recs, stage = _train_setup(tmp_path, batch_size=64)
    with pytest.raises(Exception, match="identit"):
        train_attack(tc, recs, recs, 32, stage, progress=False)
    assert not stage.path.exists()


def test_checkpoints_fall_back_then_name_the_file_and_the_log_tolerates_a_torn_line(tmp_path, caplog):
    from anonrisk.attack.train import load_encoder, train_attack

    tc, recs, stage = _train_setup(tmp_path)
    weights = train_attack(tc, recs, recs, 32, stage, progress=False)
    ck = stage / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["last.pt", "prev.pt"]
    reference = (stage / "log.jsonl").read_text()
    # a rerun from the checkpoints: last.pt truncated (a kill mid-write on a filesystem without atomic
    # rename), a torn line at the end of the log
    for p in (stage / "DONE", weights):
        p.unlink()
    (ck / "last.pt").write_bytes((ck / "last.pt").read_bytes()[:100])
    (stage / "log.jsonl").write_text(reference + '{"step": 4, "lo')
    train_attack(tc, recs, recs, 32, stage, progress=False)
    assert "last.pt is unreadable" in caplog.text and read_json(stage / "DONE")["resumed_from"] == 2
    assert (stage / "log.jsonl").read_text() == reference  # steps 2..3 rewritten identically, torn line gone
    for p in (stage / "DONE", weights):
        p.unlink()
    for name in ("last.pt", "prev.pt"):
        (ck / name).write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match=r"no readable checkpoint in .*checkpoints .*last.pt.*prev.pt.*unreadable"):
        train_attack(tc, recs, recs, 32, stage, progress=False)
    (tmp_path / "enc.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(DataError, match=r"enc.safetensors: unreadable encoder"):
        load_encoder(tc, tmp_path / "enc.safetensors")


def test_sigint_writes_a_checkpoint_and_preemption_has_its_own_exit_code(tmp_path, monkeypatch):
    import anonrisk.attack.engine as engine_mod
    from anonrisk.attack.train import Preempted, train_attack

    tc, recs, stage = _train_setup(tmp_path, checkpoint_every=100)
    real = engine_mod.contrastive_step
    calls = []

    def step_then_ctrl_c(*a, **kw):
        calls.append(1)
        out = real(*a, **kw)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(engine_mod, "contrastive_step", step_then_ctrl_c)
    with pytest.raises(Preempted, match="stopped by SIGINT at step 1") as info:
        train_attack(tc, recs, recs, 32, stage, progress=False)
    assert info.value.exit_code == 130 and (stage / "checkpoints" / "last.pt").exists()
    assert Preempted("x", signal.SIGTERM).exit_code == 75
    monkeypatch.setattr("anonrisk.cli.cmd_validate", lambda args: (_ for _ in ()).throw(Preempted("stopped", signal.SIGTERM)))
    assert cli("validate") == 75


# ---- 12. disk full names the path ------------------------------------------------------------------
def test_disk_full_names_the_path(tmp_path, monkeypatch):
    import errno

    from anonrisk.stages import write_json

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("anonrisk.stages.os.replace", full)
    with pytest.raises(DataError, match=r"no space left on the device writing .*x.json: free space and rerun"):
        write_json(tmp_path / "x.json", {"a": 1})
    assert not list(tmp_path.iterdir())  # no temporary file left


# ---- 13. results never silently replaced by other settings; grid status never calls stale results current --
def test_a_run_with_other_settings_refuses_to_overwrite_its_results(tmp_path):
    from anonrisk.config.loader import load_config
    from anonrisk.pipeline import Pipeline

    def validate(raw):
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
        return load_config(tmp_path / "c.yaml")

    base = {**TINY, "attacks": ["edge"], "runs_dir": str(tmp_path / "runs"), "results_dir": str(tmp_path / "results"),
            "evaluate": {"bootstrap": 10, "leakage": False, "utility": {"enabled": False}}}
    Pipeline(validate(base)).run()
    metrics = tmp_path / "results" / "tiny" / "metrics.json"
    before = metrics.read_bytes()
    Pipeline(validate({**base, "progress": True})).run()  # operational settings only: same numbers, rewritten
    other = validate({**base, "evaluate": {**base["evaluate"], "bootstrap": 11}})
    with pytest.raises(ConfigError, match=r"results/tiny/ holds results of other settings \(identity: other settings of edge\): "
                                          r"pass --overwrite to replace them, or give the run another name"):
        Pipeline(other).run()
    assert read_json(metrics)["results"] == json.loads(before)["results"]
    doc = Pipeline(other).run(overwrite=True)
    assert doc["config"]["evaluate"]["bootstrap"] == 11


def test_grid_status_says_stale_when_a_cell_changed(tmp_path):
    from anonrisk.launch.grid import plan_grid
    from anonrisk.launch.status import format_status, status
    from anonrisk.stages import write_json
    from tests.test_grid import write_grid

    plan = plan_grid(write_grid(tmp_path), check=False)
    cells = []
    for c in plan.cells:
        node = plan.nodes[plan.cell_nodes[c.id]["evaluate"]]
        write_json(plan.runs_dir / node.key / "result.json", {"top1": 0.5})
        write_json(plan.runs_dir / node.key / "DONE", {})
        cells.append({"id": c.id, "result": {"top1": 0.5}})
    write_json(plan.results_dir / "metrics.json", {"cells": cells, "missing": []})
    assert "(up to date)" in format_status(status(plan))
    write_json(plan.runs_dir / node.key / "result.json", {"top1": 0.7})  # the cell was redone after collect
    assert "(stale: anonrisk grid collect rewrites them)" in format_status(status(plan))


def test_prepare_command_prints_the_dropped_identities(tmp_path, capsys):
    root = write_lfw(tmp_path / "d")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"runs_dir": str(tmp_path / "runs"), "progress": False, "data": {"dataset": "lfw", "root": str(root)}}))
    assert cli("prepare", path) == 0
    assert "(9 records; 1 identities with fewer than 2 images dropped (1 images))" in capsys.readouterr().out


# ---- 14. MLflow's sqlite store is created once, under a lock ----------------------------------------------
def _hold_store_lock(db, started, release):
    from anonrisk.stages import file_lock

    with file_lock(f"{db}.lock"):
        started.set()
        release.wait(30)


def test_the_mlflow_sqlite_store_is_created_under_a_lock(tmp_path):
    import threading

    from anonrisk.tracking.store import ready_client

    db = tmp_path / "mlflow.db"
    ctx = mp.get_context("fork")
    started, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_store_lock, args=(db, started, release))
    p.start()
    assert started.wait(30)
    got = []
    t = threading.Thread(target=lambda: got.append(ready_client(f"sqlite:///{db}")))
    t.start()
    t.join(1.0)
    assert t.is_alive() and not db.exists()  # waits for the other process before creating the store
    release.set()
    t.join(120)
    p.join(30)
    assert got and db.exists() and got[0].search_experiments()[0].name == "Default"
