"""The grid launcher against the real loopback Slurm cluster and a real MLflow server.

- ``sbatch slurm/full_grid.sh`` on the smoke grid: every cell finishes, the anonymization shared by two
  backbones runs once, every metric is in MLflow and in results/; submitting again submits nothing.
- A training job requeued in the middle (``scontrol requeue``; USR2 as before a time limit) resumes from
  its checkpoint and ends with the same metrics as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml


pytestmark = [pytest.mark.services, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "grids" / "smoke.yaml"
BIN = Path(sys.executable).parent


def _env(cluster, **extra) -> dict:
    env = cluster.client_env()
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # the jobs find this venv's anonrisk and python
    env.update(OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1", **extra)
    return env


def _anonrisk(env, *args, check=True, timeout=300) -> subprocess.CompletedProcess:
    out = subprocess.run([str(BIN / "anonrisk"), *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"anonrisk {' '.join(args)} -> {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def _grid_job_ids(grid_dir: Path) -> list[str]:
    state = json.loads((grid_dir / "jobs.json").read_text())
    return [r["job_id"] for r in state["nodes"].values()] + ([state["collect"]["job_id"]] if state.get("collect") else [])


def _wait_until_unqueued(cluster, ids: list[str], grid_dir: Path, timeout: float) -> None:
    bases = {i.split("_")[0] for i in ids}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queued = cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if not any(q.split("_")[0] in bases for q in queued):
            return
        time.sleep(1)
    logs = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in sorted((grid_dir / "submitit").glob("*/*.err"))[-6:])
    raise AssertionError(f"grid jobs still queued after {timeout}s\n{cluster.diagnostics()}\n{logs}")


def _sacct_tasks(cluster, ids: list[str]) -> dict[str, str]:
    states = {}
    for base in sorted({i.split("_")[0] for i in ids}):
        states.update(cluster.sacct_states(base))
    return states


@pytest.fixture(scope="module")
def smoke_grid(slurm_cluster, mlflow_server, tmp_path_factory, timing):
    """`sbatch slurm/full_grid.sh configs/grids/smoke.yaml ...`, waited for through squeue."""
    d = tmp_path_factory.mktemp("grid")
    experiment = f"anonrisk-grid-{uuid.uuid4().hex[:8]}"
    settings = [f"runs_dir={d / 'runs'}", f"results_dir={d / 'results'}", f"tracking.tracking_uri={mlflow_server.tracking_uri}",
                f"tracking.experiment={experiment}"]
    env = _env(slurm_cluster)
    t0 = time.monotonic()
    sbatch = subprocess.run(["sbatch", "--parsable", f"--chdir={REPO}", f"--output={d}/driver-%j.out",
                             str(REPO / "slurm" / "full_grid.sh"), str(SMOKE), *settings], capture_output=True, text=True, env=env)
    assert sbatch.returncode == 0, sbatch.stderr
    driver = sbatch.stdout.strip()
    slurm_cluster.wait_sacct(driver, "COMPLETED", timeout=120)
    grid_dir = d / "runs" / "grids" / "smoke"
    ids = _grid_job_ids(grid_dir)
    _wait_until_unqueued(slurm_cluster, ids, grid_dir, timeout=420)
    timing("grid: sbatch full_grid.sh smoke -> collected", time.monotonic() - t0)
    return {"dir": d, "driver": driver, "ids": ids, "settings": settings, "env": env, "experiment": experiment,
            "grid_dir": grid_dir, "driver_log": (d / f"driver-{driver}.out").read_text()}


def test_full_grid_sh_runs_every_cell_once(smoke_grid, slurm_cluster):
    g = smoke_grid
    states = _sacct_tasks(slurm_cluster, g["ids"])
    assert states and set(states.values()) == {"COMPLETED"}, states
    state = json.loads((g["grid_dir"] / "jobs.json").read_text())
    by_stage: dict[str, list] = {}
    for key, rec in state["nodes"].items():
        by_stage.setdefault(rec["stage"], []).append((key, rec))
    # 3 anonymizers x 2 backbones: the anonymization of each anonymizer is shared by both backbones
    assert {s: len(v) for s, v in by_stage.items()} == {"prepare": 1, "anonymize": 3, "train": 6, "evaluate": 6}
    for key, rec in by_stage["anonymize"]:
        assert len(rec["cells"]) == 2
        done = json.loads((g["dir"] / "runs" / key / "DONE").read_text())
        assert done["computed"] == done["records"] > 0  # computed once, by its own job
    # the profile caps arrays at 4 tasks: 6 trainings are two arrays (4 + 2), each task its own sacct record
    arrays = sorted({rec["job_id"].split("_")[0] for _, rec in by_stage["train"]})
    assert len(arrays) == 2 and len([j for j in states if j.split("_")[0] in arrays]) == 6
    # and every evaluation waited for both training arrays
    eval_array = by_stage["evaluate"][0][1]["job_id"].split("_")[0]
    script = next((g["grid_dir"] / "submitit").rglob(f"{eval_array}_submission.sh")).read_text()
    assert f"--dependency=afterok:{arrays[0]}:{arrays[1]}" in script, script
    assert "anonymize" in g["driver_log"] and "collect" in g["driver_log"], g["driver_log"]

    doc = json.loads((g["dir"] / "results" / "smoke" / "metrics.json").read_text())
    assert doc["schema"] == "anonrisk.grid" and doc["missing"] == []
    assert len(doc["cells"]) == 6
    top1 = {c["id"]: c["result"]["attacks"]["contrastive"]["protocols"]["full-ref/linkage"]["top1"]["value"] for c in doc["cells"]}
    assert all(top1[f"anonymizer=identity,backbone={b}"] >= 0.9 for b in ("test_convnext", "test_resnet")), top1
    assert (g["dir"] / "results" / "smoke" / "comparison.md").read_text().count("| identity |") == 1


def test_max_array_size_auto_reads_the_cluster(slurm_cluster):
    from anonrisk.launch.profile import ClusterProfile, slurm_max_array_size

    assert slurm_max_array_size(ClusterProfile(max_array_size="auto")) == slurm_cluster.max_array_size


def test_every_metric_is_in_mlflow(smoke_grid, mlflow_server):
    import mlflow

    client = mlflow.MlflowClient(mlflow_server.tracking_uri)
    exp = client.get_experiment_by_name(smoke_grid["experiment"])
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["anonrisk.missing_cells"] == "none"
    assert len(children) == 6 and {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    doc = json.loads((smoke_grid["dir"] / "results" / "smoke" / "metrics.json").read_text())
    from anonrisk.tracking.mlflow_log import headline_metrics

    for c in children:
        assert c.info.status == "FINISHED"
        cell = next(x for x in doc["cells"] if x["id"] == c.data.tags["anonrisk.cell"])
        expected = headline_metrics(cell["result"])
        assert expected and {k: c.data.metrics[k] for k in expected} == pytest.approx(expected)
        assert c.data.params["grid.backbone"] == cell["axes"]["backbone"]
        assert len(client.get_metric_history(c.info.run_id, "train/loss")) == 16  # every step, logged once
    arts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"metrics.json", "comparison.md", "plots"} <= arts
    # anonrisk compare reads the same numbers back from MLflow
    out = _anonrisk(smoke_grid["env"], "compare", "--mlflow", mlflow_server.tracking_uri, "--experiment", smoke_grid["experiment"])
    assert "| noise |" in out.stdout and "backbone=test_resnet" in out.stdout


def test_submitting_again_submits_nothing(smoke_grid, slurm_cluster):
    before = slurm_cluster.run("sacct", "-X", "-n", "-P", "-o", "JobID", "-a").stdout.split()
    out = _anonrisk(smoke_grid["env"], "grid", "submit", str(SMOKE), *smoke_grid["settings"], "--executor", "slurm")
    assert "nothing to submit" in out.stdout, out.stdout
    after = slurm_cluster.run("sacct", "-X", "-n", "-P", "-o", "JobID", "-a").stdout.split()
    assert after == before
    status = _anonrisk(smoke_grid["env"], "grid", "status", str(SMOKE), *smoke_grid["settings"])
    assert "up to date" in status.stdout and "failed" in status.stdout  # the header
    assert all(line.split()[1] == line.split()[2] for line in status.stdout.splitlines()[2:6]), status.stdout


# ---- requeue in the middle of training ---------------------------------------------------------------------
def _requeue_grid(tmp: Path) -> Path:
    grid = {
        "name": "requeue",
        "base": str(REPO / "configs" / "quickstart.yaml"),
        "profile": str(REPO / "configs" / "clusters" / "loopback.yaml"),
        "fixed": {"progress": False, "data.image_size": 32, "data.synthetic": {"identities": 40, "images_per_identity": 4},
                  "attack.steps": 120, "attack.batch_size": 48, "attack.checkpoint_every": 10, "evaluate.bootstrap": 50,
                  "evaluate.leakage": False, "tracking.mlflow": False},
        "axes": {"anonymizer": ["blur"], "backbone": ["test_convnext", "test_resnet"]},
    }
    path = tmp / "requeue.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _train_progress(runs: Path) -> dict[str, int]:
    out = {}
    for log in runs.glob("train/*/log.jsonl"):
        lines = log.read_text().splitlines()
        ck = log.parent / "checkpoints"
        out[log.parent.name] = len(lines) if ck.is_dir() and any(ck.iterdir()) else 0
    return out


def test_requeued_training_resumes_with_same_metrics(slurm_cluster, tmp_path, timing):
    grid = _requeue_grid(tmp_path)
    env = _env(slurm_cluster)
    settings = [f"runs_dir={tmp_path / 'runs'}", f"results_dir={tmp_path / 'results'}"]
    t0 = time.monotonic()
    _anonrisk(env, "grid", "submit", str(grid), *settings, "--executor", "slurm")
    grid_dir = tmp_path / "runs" / "grids" / "requeue"
    state = json.loads((grid_dir / "jobs.json").read_text())
    train_jobs = {key: rec["job_id"] for key, rec in state["nodes"].items() if rec["stage"] == "train"}
    assert len(train_jobs) == 2
    # interrupt each training once it has checkpointed: one by scontrol requeue (SIGTERM, as a preemption),
    # one by USR2 (what Slurm sends ahead of the time limit; submitit then requeues)
    how = dict(zip(sorted(train_jobs), ("scontrol", "usr2")))
    hit: dict[str, int] = {}
    deadline = time.monotonic() + 240
    while len(hit) < 2 and time.monotonic() < deadline:
        for key, steps in _train_progress(tmp_path / "runs").items():
            full = f"train/{key}"
            if full in train_jobs and full not in hit and 10 <= steps < 100:
                job = train_jobs[full]
                if how[full] == "scontrol":
                    slurm_cluster.run("scontrol", "requeue", job)
                else:
                    slurm_cluster.run("scancel", "--signal=USR2", job)
                hit[full] = steps
        time.sleep(0.2)
    if len(hit) < 2:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in sorted((grid_dir / "submitit").glob("*/*.err")))
        raise AssertionError(f"trainings never reached a checkpoint mid-run: {_train_progress(tmp_path / 'runs')}\n"
                             f"{slurm_cluster.diagnostics()}\n{logs}")
    _wait_until_unqueued(slurm_cluster, _grid_job_ids(grid_dir), grid_dir, timeout=300)
    timing("grid: requeue run (2 trainings interrupted)", time.monotonic() - t0)
    for key, job in train_jobs.items():
        history = slurm_cluster.run("sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", job).stdout.split()
        assert "REQUEUED" in history and history[-1] == "COMPLETED", (how[key], history)
        done = json.loads((tmp_path / "runs" / key / "DONE").read_text())
        assert done["resumed_from"] >= 10, (how[key], done)
    # USR2: the trainer checkpointed at the step it had reached, not only at the last multiple of 10
    usr2 = next(k for k, v in how.items() if v == "usr2")
    assert json.loads((tmp_path / "runs" / usr2 / "DONE").read_text())["resumed_from"] >= hit[usr2]

    # the same grid, uninterrupted, in this process
    ref = [f"runs_dir={tmp_path / 'ref-runs'}", f"results_dir={tmp_path / 'ref-results'}"]
    _anonrisk(_env(slurm_cluster), "grid", "submit", str(grid), *ref, "--executor", "debug")
    got = json.loads((tmp_path / "results" / "requeue" / "metrics.json").read_text())
    want = json.loads((tmp_path / "ref-results" / "requeue" / "metrics.json").read_text())
    assert [c["id"] for c in got["cells"]] == [c["id"] for c in want["cells"]]
    for a, b in zip(got["cells"], want["cells"]):
        assert a["result"]["attacks"] == b["result"]["attacks"], a["id"]
