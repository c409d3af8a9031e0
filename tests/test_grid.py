"""Grid files -> stage graph (deduplicated by fingerprint), submit-time errors, the debug executor end to
end, and `anonrisk compare`. The Slurm path is in tests/cluster/test_grid_slurm.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from anonrisk.cli import main
from anonrisk.errors import ConfigError
from anonrisk.launch.grid import plan_grid

REPO = Path(__file__).resolve().parents[1]


def write_grid(tmp_path: Path, **changes) -> Path:
    grid = {
        "name": "tiny",
        "base": str(REPO / "configs" / "quickstart.yaml"),
        "profile": "local",
        "fixed": {"runs_dir": str(tmp_path / "runs"), "results_dir": str(tmp_path / "results"), "progress": False,
                  "data.image_size": 32, "data.synthetic": {"identities": 16, "images_per_identity": 3},
                  "train.steps": 6, "train.batch_size": 16, "evaluate.bootstrap": 20, "evaluate.leakage": False,
                  "tracking.experiment": "tiny-grid"},
        "axes": {"anonymizer": ["identity", "noise"], "backbone": ["test_convnext"]},
    }
    for k, v in changes.items():
        grid[k] = v
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_smoke_grid_shares_each_anonymization_across_backbones():
    plan = plan_grid(REPO / "configs" / "grids" / "smoke.yaml", {"runs_dir": "/nonexistent/runs"})
    counts = {s: len(plan.stage_nodes(s)) for s in ("prepare", "anonymize", "train", "evaluate")}
    assert counts == {"prepare": 1, "anonymize": 3, "train": 6, "evaluate": 6}
    for node in plan.stage_nodes("anonymize"):
        assert len(node.cells) == 2 and {plan.cell(c).axes["anonymizer"] for c in node.cells} == {plan.cell(node.cell).axes["anonymizer"]}
    # every cell's chain: evaluate -> train -> anonymize -> prepare
    for cell in plan.cells:
        keys = plan.cell_nodes[cell.id]
        assert plan.nodes[keys["evaluate"]].deps == [keys["train:contrastive"]]
        assert plan.nodes[keys["train:contrastive"]].deps == [keys["anonymize"]]


def test_operational_settings_never_make_new_cells():
    """A cell is named by its plan's fingerprints: another runner, batch size, Ray setting or device plans
    the same cells and stage directories (a whole-config cell name once made new cells for the same work)."""
    smoke = REPO / "configs" / "grids" / "smoke.yaml"
    a = plan_grid(smoke, {"runs_dir": "/nonexistent/runs"}, check=False)
    b = plan_grid(smoke, {"runs_dir": "/nonexistent/runs", "anonymize.runner": "ray", "anonymize.batch_size": 7, "anonymize.shard_size": 3,
                          "anonymize.ray.num_workers": 3, "anonymize.device": "cpu", "train.device": "cpu", "train.checkpoint_every": 2,
                          "progress": True, "tracking.mlflow": False}, check=False)
    assert list(a.nodes) == list(b.nodes) and a.cell_nodes == b.cell_nodes
    c = plan_grid(smoke, {"runs_dir": "/nonexistent/runs", "train.steps": 17}, check=False)  # real work: new trainings and cells
    assert {n.key for n in c.stage_nodes("anonymize")} == {n.key for n in a.stage_nodes("anonymize")}
    assert not {n.key for n in c.stage_nodes("train")} & {n.key for n in a.stage_nodes("train")}
    assert not {n.key for n in c.stage_nodes("evaluate")} & {n.key for n in a.stage_nodes("evaluate")}


def test_every_trained_attack_is_a_train_node():
    grid = plan_grid(REPO / "configs" / "grids" / "smoke.yaml",
                     {"runs_dir": "/nonexistent/runs", "attacks": ["contrastive", "edge-encoder", "edge"]}, check=False)
    trains = grid.stage_nodes("train")
    # 6 contrastive trainings; one edge-encoder training (originals only) shared by the cells of a backbone
    assert len(trains) == 6 + 2 and sorted(n.attack for n in trains).count("edge-encoder") == 2
    shared = next(n for n in trains if n.attack == "edge-encoder")
    assert len(shared.cells) == 3 and shared.deps == [grid.cell_nodes[shared.cell]["prepare"]]
    for cell in grid.cells:
        keys = grid.cell_nodes[cell.id]
        assert grid.nodes[keys["evaluate"]].deps == [keys["train:contrastive"], keys["train:edge-encoder"]]


def test_full_grid_plan_counts(monkeypatch, tmp_path):
    monkeypatch.setenv("CELEBA_ROOT", str(tmp_path))
    monkeypatch.setenv("LFW_ROOT", str(tmp_path))
    plan = plan_grid(REPO / "configs" / "grids" / "full.yaml", check=False)
    counts = {s: len(plan.stage_nodes(s)) for s in ("prepare", "anonymize", "train", "evaluate")}
    # 2 datasets x 8 anonymizers anonymized once each, reused by 2 backbones x 3 seeds
    assert counts == {"prepare": 2, "anonymize": 16, "train": 96, "evaluate": 96}
    assert plan.resources["train"].gpus == 8
    assert plan.cells[0].config.data.root == str(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"axes": {"anonymizer": ["identity", "blurr"]}}, "unknown anonymizer 'blurr'"),
    ({"axes": {"anonymizer": ["identity"], "backbone": ["resnet_51"]}}, "train.backbone 'resnet_51' is not a timm model"),
    ({"axes": {"anonymizer": ["identity"], "dataset": ["imagenet"]}}, "data.dataset: unknown dataset 'imagenet'; known: celeba, folder, hf, lfw, synthetic, unlabeled, wild"),
    ({"axes": {"anonymizer": ["identity"], "dataset": {"celeba": {"data.dataset": "celeba", "data.root": "/no/such/celeba"}}}},
     "data.root '/no/such/celeba' is not a directory"),
    ({"resources": {"train": {"gpus": 16}}}, "train.gpus=16 exceeds what cluster profile 'local' allows (max_gpus_per_node=8)"),
    ({"resources": {"trian": {"gpus": 1}}}, "unknown stage(s) trian"),
    ({"axes": {"anonymizer": ["identity"], "train.temprature": [0.1]}}, "train.temprature: unknown key"),
])
def test_bad_grid_fails_at_submit_and_queues_nothing(tmp_path, capsys, change, message):
    grid = write_grid(tmp_path, **change)
    rc = main(["grid", "submit", str(grid), "--executor", "debug"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert "cell" in err or "resources" in err
    assert not (tmp_path / "runs").exists()  # nothing prepared, no job folder, no MLflow run


def test_debug_executor_runs_the_grid_then_submits_nothing(tmp_path, capsys):
    grid = write_grid(tmp_path)
    assert main(["grid", "submit", str(grid), "--executor", "debug"]) == 0
    out = capsys.readouterr().out
    assert "| identity |" in out and "| noise |" in out
    doc = json.loads((tmp_path / "results" / "tiny" / "metrics.json").read_text())
    assert doc["schema"] == "anonrisk.grid" and doc["missing"] == [] and len(doc["cells"]) == 2
    linkage = {c["axes"]["anonymizer"]: c["result"]["attacks"]["contrastive"]["protocols"]["full-ref/linkage"]["top1"]["value"] for c in doc["cells"]}
    assert linkage["identity"] >= 0.9 and linkage["noise"] < 0.5, linkage
    before = sorted(p.name for p in (tmp_path / "runs" / "grids" / "tiny" / "submitit").iterdir())
    mtime = (tmp_path / "results" / "tiny" / "metrics.json").stat().st_mtime_ns

    assert main(["grid", "submit", str(grid), "--executor", "debug"]) == 0
    assert "nothing to submit" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "runs" / "grids" / "tiny" / "submitit").iterdir()) == before
    assert (tmp_path / "results" / "tiny" / "metrics.json").stat().st_mtime_ns == mtime

    # MLflow: one parent, one finished child per cell, with the metrics of metrics.json
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny-grid")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(runs) == 3 and len(children) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.params["grid.anonymizer"] for r in children} == {"identity", "noise"}

    # a new axis value later: only the new cell's stages run; the prepared data is reused
    grid = write_grid(tmp_path, axes={"anonymizer": ["identity", "noise", "blur"], "backbone": ["test_convnext"]})
    assert main(["grid", "submit", str(grid), "--executor", "debug"]) == 0
    state = json.loads((tmp_path / "runs" / "grids" / "tiny" / "jobs.json").read_text())
    stages = [rec["stage"] for rec in state["nodes"].values()]
    assert stages.count("anonymize") == 3 and stages.count("prepare") == 1
    assert main(["grid", "status", str(grid)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_compare_tables_from_json_and_clear_errors(tmp_path, capsys):
    grid = write_grid(tmp_path, axes={"anonymizer": ["identity", "noise"], "backbone": ["test_convnext"]})
    assert main(["grid", "submit", str(grid), "--executor", "debug"]) == 0
    capsys.readouterr()
    res = tmp_path / "results" / "tiny"
    assert main(["compare", str(res), "--metric", "contrastive.full-ref.linkage.top1", "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    doc = json.loads((res / "metrics.json").read_text())
    ident = next(c for c in doc["cells"] if c["axes"]["anonymizer"] == "identity")["result"]["attacks"]["contrastive"]["protocols"]["full-ref/linkage"]["top1"]
    assert f"| identity | {ident['value']:.3f} [{ident['ci95'][0]:.2f}, {ident['ci95'][1]:.2f}] |" in out
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 1000
    assert main(["compare", str(res), "--metric", "full-ref.top1"]) == 2
    assert "no result has metric 'full-ref.top1'" in capsys.readouterr().err
    assert main(["compare", str(res), "--rows", "dataset"]) == 2
    assert "unknown axis 'dataset'" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "nowhere")]) == 2
    assert "no results at" in capsys.readouterr().err


def test_unknown_profile_and_multi_anonymizer_cells_are_refused(tmp_path, capsys):
    grid = write_grid(tmp_path, profile="no-such-cluster")
    assert main(["grid", "plan", str(grid)]) == 2
    assert "cluster profile 'no-such-cluster' not found; known profiles: gpu-cluster, local, loopback" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="each cell needs exactly one anonymizer"):
        plan_grid(write_grid(tmp_path, axes={"backbone": ["test_convnext"]}))


def test_only_rank_0_of_a_multi_task_training_job_logs_the_loss_curve(monkeypatch, tmp_path):
    """A training stage on 2 nodes x 8 tasks runs run_stage in every task; 16 writers of one MLflow run (or
    of the default sqlite file) race, so only rank 0 logs (tests/cluster/test_gpu_shape.py runs the shape)."""
    from anonrisk.attack import dist
    from anonrisk.launch import jobs
    from anonrisk.pipeline import Pipeline
    from anonrisk.stages import StageDir
    from anonrisk.tracking import grid_mlflow

    cfg = plan_grid("configs/grids/smoke.yaml", {"runs_dir": str(tmp_path / "runs")}, check=False).cells[0].config
    monkeypatch.setattr(Pipeline, "train", lambda self, target, attack: StageDir(str(tmp_path), "train", "fp"))
    logged, closed = [], []

    class Logger:  # the live step logger of one cell's run (tests/test_tracking.py runs the real one)
        def __call__(self, step, loss, lr): ...

        def close(self, log_path):
            closed.append(log_path.name)

    monkeypatch.setattr(grid_mlflow, "training_loggers", lambda grid_dir, cells, names: [logged.append(c) or Logger() for c in cells])
    left = []
    monkeypatch.setattr(dist, "leave_process_group", lambda: left.append(1))  # not this session's group
    import torch.distributed

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)  # a job process: the stage makes its group
    for rank in (3, 0):
        monkeypatch.setattr(dist, "read_env", lambda rank=rank: dist.DistEnv(rank, 16, rank % 8, "127.0.0.1", 29500, "slurm"))
        jobs.run_stage("train", cfg.model_dump(mode="json"), str(tmp_path), "cell", ["cell", "other"], "contrastive")
    assert logged == ["cell", "other"] and closed == ["log.jsonl"] * 2  # rank 3 logged nothing, rank 0 both cells
    assert len(left) == 2  # and every rank left the group together before its process exits
    # a group the caller made before the stage (the debug executor, a test session's) is the caller's to end:
    # destroying it broke every later DeepSpeed engine of the process ("Group ... is not registered")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    jobs.run_stage("train", cfg.model_dump(mode="json"), str(tmp_path), "cell", ["cell"], "contrastive")
    assert len(left) == 2


def test_dependencies_are_per_task_so_a_failure_cancels_only_its_descendants():
    """A Slurm array has one dependency for all its tasks: nodes are grouped by the exact upstream tasks
    they wait for (tests/cluster/test_grid_failure.py runs a failing cell on the real cluster)."""
    from anonrisk.launch.driver import dependency_groups
    from anonrisk.launch.grid import Node

    def nodes(*deps):
        return [Node("x", f"n{i}", "c", list(d)) for i, d in enumerate(deps)]

    def groups(todo, live, arrays):
        return [(dep, [n.key for n in group]) for dep, group in dependency_groups(todo, live, arrays)]

    live = {"a0": "7_0", "a1": "7_1", "a2": "7_2", "old": "3_5", "single": "9", "done-elsewhere": "4"}
    arrays = {"7": ["a0", "a1", "a2"]}
    # two trainings per anonymization: one array per anonymization task, never the whole array
    assert groups(nodes(["a0"], ["a0"], ["a1"], ["a1"]), live, arrays) == [("afterok:7_0", ["n0", "n1"]), ("afterok:7_1", ["n2", "n3"])]
    # one downstream node per task of an array submitted now, in any order: task i after task i
    assert groups(nodes(["a2"], ["a0"], ["a1"]), live, arrays) == [("aftercorr:7", ["n1", "n2", "n0"])]
    # a 1:1 map onto part of the array, a task queued by an earlier submit, a plain job, several, none
    assert groups(nodes(["a0"], ["a2"]), live, arrays) == [("afterok:7_0", ["n0"]), ("afterok:7_2", ["n1"])]
    assert groups(nodes(["old"], ["single"], ["a0", "single"], ["done"], []), live, arrays) == [
        ("afterok:3_5", ["n0"]), ("afterok:9", ["n1"]), ("afterok:7_0:9", ["n2"]), (None, ["n3", "n4"])]


def test_status_names_the_rank_whose_log_holds_the_error(tmp_path):
    """A multi-rank training writes one log per rank (submitit/<job>/<job>_<rank>_log.err): status points
    at the first rank whose log ends in a traceback, with that traceback's error line; a job without a
    traceback points at rank 0's log; a job that never started has no log."""
    from anonrisk.launch.status import failure

    folder = tmp_path / "submitit" / "41_3"
    folder.mkdir(parents=True)
    for rank in (0, 2, 10):
        (folder / f"41_3_{rank}_log.err").write_text("srun: step started\n")
    (folder / "41_3_10_log.err").write_text("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                                          "    raise DataError('a')\nanonrisk.errors.DataError: gone.png: cannot decode\n")
    (folder / "41_3_2_log.err").write_text("Traceback (most recent call last):\n  File \"y.py\"\nRuntimeError: NCCL error\n"
                                         "submitit WARNING: bypassing\n")
    assert failure(tmp_path, "41_3") == (folder / "41_3_2_log.err", "RuntimeError: NCCL error")
    (folder / "41_3_2_log.err").write_text("fine\n")
    assert failure(tmp_path, "41_3") == (folder / "41_3_10_log.err", "anonrisk.errors.DataError: gone.png: cannot decode")
    for rank in (2, 10):
        (folder / f"41_3_{rank}_log.err").unlink()
    assert failure(tmp_path, "41_3") == (folder / "41_3_0_log.err", None)
    assert failure(tmp_path, "99") == (None, None)


@pytest.mark.slow  # two tiny grids on the debug executor: about 25 s on 2 quiet cores
def test_resubmitted_grid_with_changed_settings_never_leaves_mlflow_stale(tmp_path, capsys):
    """Issue 15.4: MLflow child runs are keyed by the cell's fingerprint, not its label. After train.seed=1 the
    old runs say "(superseded)", the new ones hold the new numbers, and compare --mlflow agrees with JSON."""
    import mlflow

    grid = write_grid(tmp_path, axes={"anonymizer": ["identity", "noise"], "backbone": ["test_convnext"]})
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    tables = []
    for seed in (0, 1):
        fixed = yaml.safe_load(grid.read_text())["fixed"] | {"train.seed": seed}
        grid = write_grid(tmp_path, axes={"anonymizer": ["identity", "noise"], "backbone": ["test_convnext"]}, fixed=fixed)
        assert main(["grid", "submit", str(grid), "--executor", "debug"]) == 0
        capsys.readouterr()
        metric = ["--metric", "contrastive.full-ref.exclude-source.top1"]
        assert main(["compare", str(tmp_path / "results" / "tiny"), *metric]) == 0
        from_json = capsys.readouterr().out
        assert main(["compare", "--mlflow", uri, "--experiment", "tiny-grid", *metric]) == 0
        from_mlflow = capsys.readouterr().out  # MLflow alone: the same table as the JSON results
        assert sorted(from_mlflow.splitlines()) == sorted(from_json.splitlines()) and "| noise |" in from_json
        tables.append(from_json)
    assert tables[0] != tables[1]  # the seed changed the numbers (else this test could not fail)
    runs = client.search_runs([client.get_experiment_by_name("tiny-grid").experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    stale = [r for r in children if "anonrisk.superseded_by" in r.data.tags]
    assert len(children) == 4 and len(stale) == 2 and all(r.info.run_name.endswith("(superseded)") for r in stale)
    fresh = {r.data.tags["anonrisk.cell"]: r for r in children if r not in stale}
    doc = json.loads((tmp_path / "results" / "tiny" / "metrics.json").read_text())
    for cell in doc["cells"]:
        top1 = cell["result"]["attacks"]["contrastive"]["protocols"]["full-ref/exclude-source"]["top1"]["value"]
        assert fresh[cell["id"]].data.metrics["contrastive/top1"] == pytest.approx(top1)
        assert fresh[cell["id"]].data.tags["anonrisk.fingerprint"] == plan_grid(grid).cell(cell["id"]).target.cell.fingerprint
        assert len(client.get_metric_history(fresh[cell["id"]].info.run_id, "train/loss")) == 6  # every step, once
