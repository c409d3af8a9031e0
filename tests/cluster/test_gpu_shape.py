"""The loopback cluster at the shape of a GPU cluster: two nodes with 8 fake GPUs each (GRES), one slurmd per
node on this host.

- Every stage request of configs/grids/full.yaml on configs/clusters/gpu-cluster.yaml (as the grid launcher
  builds it: --gpus-per-node=8, 8 tasks per node x 16 CPUs, 128 GB, partition gpu; and on 2 nodes) is
  accepted and runs; each task sees the GPUs a real node would show it and picks its own.
- ``sbatch slurm/full_grid.sh`` on a grid whose training stage is 2 nodes x 8 ranks (gloo, device cpu):
  the 16 srun-launched ranks reproduce a one-process run of the same global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import cloudpickle
import pytest
import yaml

pytestmark = [pytest.mark.services, pytest.mark.slow]
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the probe below runs in the jobs
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SHAPE = "%i %P %D %C %b %N %T"  # squeue: job, partition, nodes, CPUs, GPUs per node, node list, state


def probe(hold_s: float = 0.0) -> dict:
    """One task's view of its allocation (submitit's ``results()`` holds every task's)."""
    from anonrisk.attack.dist import local_gpu_index, read_env

    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    env = read_env()
    info = {k: os.environ.get(k) for k in ("SLURMD_NODENAME", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_NUM_NODES",
                                           "SLURM_CPUS_PER_TASK", "SLURM_JOB_PARTITION")}
    info.update(visible=visible, rank=env.rank, world=env.world_size, local_rank=env.local_rank,
                gpu=local_gpu_index(env.local_rank, len(visible)) if visible else None)
    time.sleep(hold_s)
    return info


def _tasks(job) -> list[dict]:
    return sorted(job.results(), key=lambda t: int(t["SLURM_PROCID"]))


def _wait_done(jobs, cluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(j.done() for j in jobs):
        if time.monotonic() > deadline:
            for j in jobs:
                j.cancel(check=False)
            raise AssertionError(f"jobs {[j.job_id for j in jobs]} not done after {timeout}s\n{cluster.diagnostics(jobs[0].job_id)}")
        time.sleep(0.3)


def _squeue_while_running(cluster, job_id: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = cluster.run("squeue", "-h", "-j", job_id, "-o", SHAPE, check=False).stdout.strip()
        if line.endswith("RUNNING"):
            return line
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never ran\n{cluster.diagnostics(job_id)}")


def test_the_full_grids_requests_are_scheduled_as_written(slurm_cluster, tmp_path, monkeypatch):
    from anonrisk.launch import driver
    from anonrisk.launch.grid import plan_grid

    for var in ("CELEBA_ROOT", "LFW_ROOT"):  # planning checks that the roots are folders, not what they hold
        (tmp_path / var.lower()).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    plan = plan_grid(REPO / "configs" / "grids" / "full.yaml", {"runs_dir": str(tmp_path / "runs")}, check=False)
    assert plan.profile.name == "gpu-cluster" and plan.profile.partition == "gpu"
    plan.profile = plan.profile.model_copy(update={"setup": []})  # the template's `source ~/anonrisk/.venv/...`
    nodes = slurm_cluster.run("sinfo", "-h", "-N", "-p", "gpu", "-o", "%N %c %G %t").stdout.split("\n")
    print("\n".join(nodes))
    assert [n.split()[:3] for n in nodes if n] == [["n1", "128", "gpu:8"], ["n2", "128", "gpu:8"]]

    two_nodes = plan.resources["train"].model_copy(update={"nodes": 2})  # resources: {train: {nodes: 2, ...}}
    cases = [(s, plan.resources[s]) for s in driver.STAGES + ("collect",)] + [("train-2-nodes", two_nodes)]
    for name, res in cases:
        plan.resources["train"] = res if name.startswith("train") else plan.resources["train"]
        ex = driver._executor(plan, "slurm", "train" if name.startswith("train") else name)
        job = ex.submit(probe, 2.0 if name == "train-2-nodes" else 0.0)
        if name == "train-2-nodes":
            print(slurm_cluster.run("squeue", "-o", SHAPE).stdout.splitlines()[0])
            print(_squeue_while_running(slurm_cluster, job.job_id))
        _wait_done([job], slurm_cluster, timeout=120)
        tasks = _tasks(job)
        assert len(tasks) == res.nodes * res.tasks_per_node, (name, tasks)
        assert {t["SLURM_JOB_PARTITION"] for t in tasks} == {"gpu"}
        assert {t["SLURM_CPUS_PER_TASK"] for t in tasks} == {str(res.cpus)}
        assert len({t["SLURMD_NODENAME"] for t in tasks}) == res.nodes
        for t in tasks:  # each task sees the node's GPUs and takes its own
            assert len(t["visible"]) == res.gpus and (t["gpu"] == t["local_rank"] if res.gpus > 1 else t["gpu"] in (0, None)), t
        assert [t["rank"] for t in tasks] == list(range(len(tasks))) and {t["world"] for t in tasks} == {len(tasks)}
        slurm_cluster.wait_sacct(job.job_id, "COMPLETED", timeout=30)
        tres = slurm_cluster.run("sacct", "-X", "-n", "-P", "-j", job.job_id, "-o", "NNodes,AllocTRES").stdout.strip()
        assert tres.startswith(f"{res.nodes}|") and (f"gres/gpu={res.gpus * res.nodes}" in tres or res.gpus == 0), (name, tres)
        print(name, tres)
        script = next(Path(job.paths.submission_file.parent).glob(f"{job.job_id}_submission.sh")).read_text()
        assert res.mem_gb is None or f"#SBATCH --mem={int(res.mem_gb)}GB" in script, script  # memory as asked, too


def test_one_gpu_per_task_is_cuda_0_for_every_rank(slurm_cluster, tmp_path):
    """`srun --gpus-per-task=1` (docs/training.md) shows each task only its own GPU, as device 0: a rank that
    took cuda:<local rank> would ask for a device it cannot see."""
    import submitit

    ex = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    ex.update_parameters(slurm_partition="gpu", nodes=2, tasks_per_node=4, cpus_per_task=1, timeout_min=5, slurm_gpus_per_task=1)
    job = ex.submit(probe)
    _wait_done([job], slurm_cluster, timeout=120)
    tasks = _tasks(job)
    assert len(tasks) == 8 and all(len(t["visible"]) == 1 and t["gpu"] == 0 for t in tasks), tasks
    assert max(t["local_rank"] for t in tasks) == 3  # what cuda:<local rank> would have asked for


# ---- the training stage of a grid, 2 nodes x 8 ranks ---------------------------------------------------
STEPS = 4


def _grid(tmp: Path, experiment: str, tracking_uri: str) -> Path:
    grid = {
        "name": "gpu-shape",
        "base": str(REPO / "configs" / "quickstart.yaml"),
        "profile": str(REPO / "configs" / "clusters" / "loopback-gpu.yaml"),
        "fixed": {"progress": False, "data.image_size": 32, "data.synthetic": {"identities": 30, "images_per_identity": 4, "seed": 0},
                  "attacks": ["contrastive"],
                  # SGD: AdamW divides each near-zero gradient element by its own size, which turns float
                  # summation order into lr-sized weight differences; the data-parallel path is the same
                  "train": {"device": "cpu", "steps": STEPS, "batch_size": 32, "optimizer": "sgd", "lr": 0.05, "checkpoint_every": 2},
                  "evaluate.bootstrap": 20, "evaluate.leakage": False, "tracking.tracking_uri": tracking_uri,
                  "tracking.experiment": experiment},
        "axes": {"anonymizer": ["blur"], "backbone": ["test_convnext"]},
        "resources": {"train": {"nodes": 2, "tasks_per_node": 8, "gpus": 8}},
    }
    path = tmp / "gpu-shape.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _losses(train_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (train_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.timeout(900)  # about 4 minutes on 2 shared cores: 16 Python processes start on them
def test_sixteen_ranks_on_two_nodes_match_one_process(slurm_cluster, mlflow_server, tmp_path, timing):
    import mlflow
    from safetensors.torch import load_file

    from anonrisk.launch.grid import plan_grid
    from anonrisk.pipeline import Pipeline

    grid = _grid(tmp_path, f"gpu-shape-{uuid.uuid4().hex[:8]}", mlflow_server.tracking_uri)
    settings = [f"runs_dir={tmp_path / 'runs'}", f"results_dir={tmp_path / 'results'}"]
    env = slurm_cluster.client_env()
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env.update(MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1")
    t0 = time.monotonic()
    sbatch = subprocess.run(["sbatch", "--parsable", f"--chdir={REPO}", f"--output={tmp_path}/driver-%j.out",
                             str(REPO / "slurm" / "full_grid.sh"), str(grid), *settings], capture_output=True, text=True, env=env)
    assert sbatch.returncode == 0, sbatch.stderr
    slurm_cluster.wait_sacct(sbatch.stdout.strip(), "COMPLETED", timeout=120)
    grid_dir = tmp_path / "runs" / "grids" / "gpu-shape"
    state = json.loads((grid_dir / "jobs.json").read_text())
    train_key, train = next((k, r) for k, r in state["nodes"].items() if r["stage"] == "train")
    print(slurm_cluster.run("squeue", "-o", SHAPE).stdout.splitlines()[0])
    print(_squeue_while_running(slurm_cluster, train["job_id"], timeout=300))
    ids = [r["job_id"] for r in state["nodes"].values()] + [state["collect"]["job_id"]]
    deadline = time.monotonic() + 720
    while any(q.split("_")[0] in {i.split("_")[0] for i in ids} for q in slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.split()):
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted((grid_dir / "submitit").rglob("*_0_log.err")))
            raise AssertionError(f"grid still queued\n{slurm_cluster.diagnostics()}\n{logs}")
        time.sleep(1)
    timing("grid: 2 nodes x 8 ranks training grid -> collected", time.monotonic() - t0)
    for jid in ids:
        assert set(slurm_cluster.sacct_states(jid.split("_")[0]).values()) == {"COMPLETED"}, (jid, slurm_cluster.diagnostics(jid))
    acct = slurm_cluster.run("sacct", "-n", "-P", "-j", train["job_id"], "-o", "JobID,NNodes,NTasks,NodeList,AllocTRES,Elapsed").stdout
    print(acct)
    alloc = acct.splitlines()[0].split("|")
    assert alloc[1] == "2" and alloc[3] == "n[1-2]" and "gres/gpu=16" in alloc[4], acct
    assert any(line.split("|")[2] == "16" for line in acct.splitlines()[1:]), acct  # the srun step: 16 tasks
    done = json.loads((tmp_path / "runs" / train_key / "DONE").read_text())
    assert done["world_size"] == 16 and done["steps"] == STEPS, done
    timing("grid: 16-rank training job (sacct Elapsed, s)", sum(int(x) * 60**i for i, x in enumerate(reversed(alloc[5].split(":")))))

    # one rank logged the loss curve: every step once
    client = mlflow.MlflowClient(mlflow_server.tracking_uri)
    child = json.loads((grid_dir / "mlflow.json").read_text())["children"]
    run_id = next(iter(child.values()))["run_id"]
    assert len(client.get_metric_history(run_id, "train/loss")) == STEPS

    # the same cell in this process, one rank with the whole global batch
    cfg = plan_grid(grid, {"runs_dir": str(tmp_path / "ref")}, check=False).cells[0].config
    ref = Pipeline(cfg).train(cfg.anonymizers[0], "contrastive")
    got = tmp_path / "runs" / train_key
    diffs = [abs(a - b) for a, b in zip(_losses(got), _losses(ref.path))]
    assert len(diffs) == STEPS and max(diffs) <= 2e-6, (_losses(got), _losses(ref.path))  # the log rounds to 1e-6
    w, w_ref = load_file(str(got / "encoder.safetensors")), load_file(str(ref.path / "encoder.safetensors"))
    worst = max((w[k].float() - w_ref[k].float()).abs().max().item() for k in w_ref)
    print(f"16 ranks vs 1 process: loss |diff| max {max(diffs):.2e}, weights |diff| max {worst:.2e}")
    assert worst < 1e-5, worst
