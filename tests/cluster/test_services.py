"""Against real services: a one-node Slurm cluster with accounting, and an MLflow tracking server.

What the grid launcher will rely on: sbatch + sacct, submitit functions and job arrays, a
`submitit.helpers.Checkpointable` that resumes after a requeue (both submitit's own checkpoint-on-signal path
and a plain `scontrol requeue`, which kills without a checkpoint), MLflow parent/child runs through the
server, and a Slurm job logging to that server.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import cloudpickle
import pytest
import submitit

pytestmark = [pytest.mark.services, pytest.mark.slow]

# The job callables below live in this test module, which the job's Python cannot import by name:
# ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ------------------------------------------------------------------------------------------ helpers
def wait_until(cond: Callable[[], bool], timeout: float, what: str, diag: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{diag()}")
        time.sleep(0.2)


def wait_jobs(jobs: List[submitit.Job], cluster, timeout: float) -> None:
    """job.result() blocks forever on a lost job: wait with a deadline, cancel and explain on timeout."""
    try:
        wait_until(lambda: all(j.done() for j in jobs), timeout, f"submitit jobs {[j.job_id for j in jobs]}",
                   lambda: cluster.diagnostics(jobs[0].job_id.split("_")[0]) + "\n" + _job_logs(jobs))
    except AssertionError:
        for j in jobs:
            j.cancel(check=False)
        raise


def _job_logs(jobs: List[submitit.Job]) -> str:
    out = []
    for j in jobs:
        out.append(f"--- {j.job_id} stderr\n{(j.stderr() or '')[-2000:]}")
    return "\n".join(out)


def make_executor(folder: Path, cluster, **params) -> submitit.AutoExecutor:
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    assert ex.cluster == "slurm"
    ex.update_parameters(timeout_min=5, slurm_partition=cluster.partition, cpus_per_task=1, mem_gb=1, **params)
    return ex


def jsonl(path: Path) -> List[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ job code
def add(a: int, b: int) -> Dict[str, object]:
    env = submitit.JobEnvironment()
    return {"sum": a + b, "job_id": env.job_id, "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "cpus": os.environ.get("SLURM_CPUS_PER_TASK")}


def square(x: int) -> Dict[str, object]:
    env = submitit.JobEnvironment()
    return {"square": x * x, "array_job_id": env.array_job_id, "array_task_id": env.array_task_id}


def log_run_to_mlflow(tracking_uri: str, experiment_id: str, value: float) -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    run = client.create_run(experiment_id, run_name="from-slurm",
                            tags={"slurm_job_id": os.environ.get("SLURM_JOB_ID", "")})
    client.log_param(run.info.run_id, "value", value)
    client.log_metric(run.info.run_id, "twice", 2 * value)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


class ResumableSum(submitit.helpers.Checkpointable):
    """Sums i*i for i < n, one step every `step_s` seconds, keeping its progress twice:

    - in memory (`self.state`), which submitit's default `checkpoint()` pickles when the job gets the
      preemption/timeout signal (USR2), before submitit requeues it;
    - on disk (`progress.json`, replaced atomically after every step), for a requeue that kills the job
      without a checkpoint (`scontrol requeue`, a node failure).

    On start it resumes from whichever is further along. Every attempt, step and checkpoint is appended
    to a log in `workdir` so the test can tell a resume from a redo. With `pause_at`, the first attempt
    stops before step `pause_at` and waits there (touching `paused`) until it is signalled or killed:
    the test interrupts it at a known point instead of racing a running loop.
    """

    def __init__(self, n: int, workdir: str, step_s: float, pause_at: int = -1) -> None:
        self.n = n
        self.workdir = str(workdir)
        self.step_s = step_s
        self.pause_at = pause_at
        self.state = (0, 0)  # (next_i, total): replaced in one assignment, so a signal never sees half

    def _append(self, name: str, record: dict) -> None:
        with open(Path(self.workdir) / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def __call__(self) -> Dict[str, object]:
        wd = Path(self.workdir)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        from_memory = self.state
        progress = wd / "progress.json"
        disk = json.loads(progress.read_text()) if progress.exists() else {"next_i": 0, "total": 0}
        from_disk = (disk["next_i"], disk["total"])
        self.state = max(from_memory, from_disk)
        self._append("attempts.jsonl", {"restart": restarts, "start_i": self.state[0], "from_memory": from_memory[0],
                                        "from_disk": from_disk[0], "pid": os.getpid(), "t": time.time()})
        while self.state[0] < self.n:
            i, total = self.state
            if restarts == 0 and i == self.pause_at:
                (wd / "paused").touch()
                while True:  # until USR2 (checkpoint + requeue) or SIGKILL (scontrol requeue)
                    time.sleep(0.05)
            time.sleep(self.step_s)
            self._append("steps.jsonl", {"i": i, "restart": restarts})
            new = (i + 1, total + i * i)
            tmp = wd / f".progress.{os.getpid()}.tmp"
            tmp.write_text(json.dumps({"next_i": new[0], "total": new[1]}))
            os.replace(tmp, progress)
            self.state = new
        return {"total": self.state[1], "restarts": restarts}

    def checkpoint(self, *args, **kwargs):
        self._append("checkpoints.jsonl", {"next_i": self.state[0], "t": time.time()})
        return super().checkpoint(*args, **kwargs)


# ------------------------------------------------------------------------------------------ Slurm
def test_cluster_config(slurm_cluster):
    cfg = slurm_cluster.run("scontrol", "show", "config").stdout
    conf = {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in cfg.splitlines()) if v}
    assert conf["MaxArraySize"] == str(slurm_cluster.max_array_size)
    assert conf["AccountingStorageType"] == "accounting_storage/slurmdbd"
    assert f"cred_expire={slurm_cluster.env['ANONRISK_SLURM_CRED_EXPIRE']}" in conf["AuthInfo"]
    node = slurm_cluster.run("sinfo", "-h", "-N", "-p", slurm_cluster.partition, "-o", "%N %c %t").stdout.split()
    assert node[1] == "2" and node[2] in ("idle", "mix", "alloc"), node
    clusters = slurm_cluster.run("sacctmgr", "-n", "-P", "show", "cluster", "format=cluster").stdout.split()
    assert slurm_cluster.env["ANONRISK_SLURM_CLUSTER"] in clusters


def test_sbatch_trivial_job_completes_in_sacct(slurm_cluster, tmp_path, timing):
    t = time.monotonic()
    job_id = slurm_cluster.run("sbatch", "--parsable", "-o", str(tmp_path / "out-%j.txt"),
                               "--wrap", "echo hello from $SLURM_JOB_ID").stdout.strip().split(";")[0]
    final = slurm_cluster.wait_sacct(job_id, "COMPLETED", timeout=60)
    timing("slurm: sbatch -> COMPLETED in sacct", time.monotonic() - t)
    assert final == {job_id: "COMPLETED"}
    assert (tmp_path / f"out-{job_id}.txt").read_text().strip() == f"hello from {job_id}"


def test_submitit_function_returns_result(slurm_cluster, tmp_path, timing):
    ex = make_executor(tmp_path / "submitit", slurm_cluster, name="anonrisk-add",
                       slurm_additional_parameters={"comment": "anonrisk-smoke"})
    t = time.monotonic()
    job = ex.submit(add, 2, 3)
    wait_jobs([job], slurm_cluster, timeout=60)
    result = job.result()
    timing("submitit: submit -> result", time.monotonic() - t)
    assert result == {"sum": 5, "job_id": job.job_id, "slurm_job_id": job.job_id, "cpus": "1"}
    slurm_cluster.wait_sacct(job.job_id, "COMPLETED", timeout=30)
    shown = slurm_cluster.run("scontrol", "show", "job", job.job_id).stdout
    assert "Comment=anonrisk-smoke" in shown and "JobName=anonrisk-add" in shown


def test_submitit_job_array_of_3(slurm_cluster, tmp_path, timing):
    ex = make_executor(tmp_path / "submitit", slurm_cluster, slurm_array_parallelism=2)
    t = time.monotonic()
    jobs = ex.map_array(square, [1, 2, 3])
    wait_jobs(jobs, slurm_cluster, timeout=60)
    results = [j.result() for j in jobs]
    timing("submitit: array of 3 -> results", time.monotonic() - t)
    array_id = jobs[0].job_id.split("_")[0]
    assert [j.job_id for j in jobs] == [f"{array_id}_{i}" for i in range(3)]
    assert results == [{"square": x * x, "array_job_id": array_id, "array_task_id": str(i)}
                       for i, x in enumerate([1, 2, 3])]
    final = slurm_cluster.wait_sacct(array_id, "COMPLETED", n=3, timeout=30)
    assert set(final) == {f"{array_id}_{i}" for i in range(3)}
    # one sbatch for the whole array, throttled as asked
    sbatch = next((tmp_path / "submitit").glob("*_submission.sh")).read_text()
    assert "#SBATCH --array=0-2%2" in sbatch


# The two requeue scenarios run side by side (one CPU each) so that their waits overlap: a requeued job
# may start again only after its credential expired (cred_expire=10 s), and after `scontrol requeue` the
# old run first gets KillWait (5 s) between SIGTERM (which submitit ignores) and SIGKILL.
STEP_S, N_STEPS, PAUSE_AT = 0.1, 12, 5


@dataclass
class RequeueRun:
    job: submitit.Job
    workdir: Path
    t_trigger: float = 0.0
    t_done: float = 0.0


@pytest.fixture(scope="module")
def requeue_runs(slurm_cluster, tmp_path_factory):
    """Submit both scenarios, interrupt each at step PAUSE_AT, and wait (bounded) for both to finish."""
    base = tmp_path_factory.mktemp("requeue")
    ex = make_executor(base / "submitit", slurm_cluster)
    runs: Dict[str, RequeueRun] = {}
    for mode in ("scontrol", "signal"):
        wd = base / mode
        wd.mkdir()
        runs[mode] = RequeueRun(ex.submit(ResumableSum(N_STEPS, str(wd), STEP_S, pause_at=PAUSE_AT)), wd)
    try:
        for mode, run in runs.items():
            wait_until((run.workdir / "paused").exists, 60, f"{mode} job to reach step {PAUSE_AT}",
                       lambda: slurm_cluster.diagnostics(run.job.job_id) + _job_logs([run.job]))
            run.t_trigger = time.monotonic()
            if mode == "scontrol":
                slurm_cluster.run("scontrol", "requeue", run.job.job_id)  # kill + requeue, no checkpoint
            else:
                # What Slurm sends ahead of a time limit or a preemption (submitit's --signal=USR2@90):
                # submitit calls checkpoint(), pickles the callable and requeues the job itself.
                slurm_cluster.run("scancel", "--signal=USR2", run.job.job_id)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(r.t_done for r in runs.values()):
            for r in runs.values():
                if not r.t_done and r.job.done():
                    r.t_done = time.monotonic()
            time.sleep(0.2)
        yield runs  # a run still not done fails in its test, with diagnostics
    finally:
        for run in runs.values():
            if not run.job.done():
                run.job.cancel(check=False)


def _check_resumed(run: RequeueRun, cluster, mode: str, timing) -> Dict[str, object]:
    wait_jobs([run.job], cluster, timeout=5)
    result = run.job.result()
    timing(f"requeue ({mode}): trigger -> done", run.t_done - run.t_trigger)
    attempts = jsonl(run.workdir / "attempts.jsonl")
    steps = [(s["i"], s["restart"]) for s in jsonl(run.workdir / "steps.jsonl")]
    assert result == {"total": sum(i * i for i in range(N_STEPS)), "restarts": 1}
    assert [(a["restart"], a["start_i"]) for a in attempts] == [(0, 0), (1, PAUSE_AT)], attempts
    # resumed, not redone: steps before the interruption ran once in the first attempt, the rest once in
    # the second
    assert steps == [(i, 0) for i in range(PAUSE_AT)] + [(i, 1) for i in range(PAUSE_AT, N_STEPS)], steps
    cluster.wait_sacct(run.job.job_id, "COMPLETED", timeout=30)
    history = cluster.run("sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", run.job.job_id).stdout.split()
    assert "REQUEUED" in history and history[-1] == "COMPLETED", history
    return {"attempts": attempts}


def test_checkpointable_resumes_after_scontrol_requeue(slurm_cluster, requeue_runs, timing):
    run = requeue_runs["scontrol"]
    out = _check_resumed(run, slurm_cluster, "scontrol requeue", timing)
    # killed without checkpoint(): it resumed from its progress file on disk
    assert jsonl(run.workdir / "checkpoints.jsonl") == []
    second = out["attempts"][1]
    assert (second["from_memory"], second["from_disk"]) == (0, PAUSE_AT)


def test_checkpointable_resumes_after_preemption_signal(slurm_cluster, requeue_runs, timing):
    run = requeue_runs["signal"]
    out = _check_resumed(run, slurm_cluster, "USR2 checkpoint", timing)
    # resumed from the state that checkpoint() pickled
    assert [c["next_i"] for c in jsonl(run.workdir / "checkpoints.jsonl")] == [PAUSE_AT]
    assert out["attempts"][1]["from_memory"] == PAUSE_AT


# ------------------------------------------------------------------------------------------ MLflow
def test_mlflow_parent_and_child_runs_roundtrip(mlflow_server, tmp_path, timing):
    import mlflow

    client = mlflow.MlflowClient(mlflow_server.tracking_uri)
    t = time.monotonic()
    exp_id = client.create_experiment(f"anonrisk-services-{os.getpid()}-{time.time_ns()}")
    parent = client.create_run(exp_id, run_name="grid", tags={"anonrisk.kind": "grid"})
    pid = parent.info.run_id
    client.log_param(pid, "backbone", "resnet50")
    for step, v in enumerate([0.5, 0.25, 0.125]):
        client.log_metric(pid, "loss", v, step=step)
    child = client.create_run(exp_id, run_name="cell-0", tags={"mlflow.parentRunId": pid})
    cid = child.info.run_id
    client.log_param(cid, "protocol", "few-ref")
    client.log_metric(cid, "top1", 0.681)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"top1": 0.681}))
    client.log_artifact(cid, str(report), artifact_path="results")
    client.set_terminated(cid)
    client.set_terminated(pid)
    timing("mlflow: experiment + 2 runs logged", time.monotonic() - t)

    got_parent, got_child = client.get_run(pid), client.get_run(cid)
    assert got_parent.data.params == {"backbone": "resnet50"}
    assert [m.value for m in client.get_metric_history(pid, "loss")] == [0.5, 0.25, 0.125]
    assert got_child.data.params == {"protocol": "few-ref"}
    assert got_child.data.metrics == {"top1": 0.681}
    assert got_child.data.tags["mlflow.parentRunId"] == pid
    assert got_parent.info.status == got_child.info.status == "FINISHED"
    children = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{pid}'")
    assert [r.info.run_id for r in children] == [cid]
    assert [a.path for a in client.list_artifacts(cid, "results")] == ["results/report.json"]
    local = client.download_artifacts(cid, "results/report.json", str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text()) == {"top1": 0.681}
    # artifacts are proxied by the server and land under its directory
    assert list(mlflow_server.dir.joinpath("artifacts").rglob("report.json"))


def test_slurm_job_logs_to_mlflow_server(slurm_cluster, mlflow_server, tmp_path, timing):
    import mlflow

    client = mlflow.MlflowClient(mlflow_server.tracking_uri)
    exp_id = client.create_experiment(f"anonrisk-from-slurm-{os.getpid()}-{time.time_ns()}")  # submitter creates
    ex = make_executor(tmp_path / "submitit", slurm_cluster)
    t = time.monotonic()
    job = ex.submit(log_run_to_mlflow, mlflow_server.tracking_uri, exp_id, 1.5)
    wait_jobs([job], slurm_cluster, timeout=90)
    run_id = job.result()
    timing("slurm job -> mlflow run logged", time.monotonic() - t)
    run = client.get_run(run_id)
    assert run.info.experiment_id == exp_id and run.info.status == "FINISHED"
    assert run.data.params == {"value": "1.5"} and run.data.metrics == {"twice": 3.0}
    assert run.data.tags["slurm_job_id"] == job.job_id


# ------------------------------------------------------------------------------------------ restart
def test_cluster_up_again_restarts_cleanly_and_keeps_accounting(slurm_cluster, tmp_path, timing):
    """`cluster.sh up` on a live cluster dir stops it by its pidfiles and starts it on the same data."""
    first = slurm_cluster.run("sbatch", "--parsable", "-o", str(tmp_path / "first.txt"),
                              "--wrap", "true").stdout.strip().split(";")[0]
    slurm_cluster.wait_sacct(first, "COMPLETED", timeout=60)
    old_pids = dict(slurm_cluster.pids)
    t = time.monotonic()
    out = slurm_cluster.up_again()
    assert out.returncode == 0, out.stdout + out.stderr
    timing("slurm: cluster up again (restart)", time.monotonic() - t)
    assert not [p for p in old_pids.values() if slurm_cluster.alive(p)], "old daemons still alive after restart"
    assert set(slurm_cluster.pids) == set(old_pids) and not set(slurm_cluster.pids.values()) & set(old_pids.values())
    # accounting survived (ask by job id: time-window queries such as `sacct -S` lag a few seconds)
    assert slurm_cluster.sacct_states(first) == {first: "COMPLETED"}
    job_id = slurm_cluster.run("sbatch", "--parsable", "-o", str(tmp_path / "o.txt"),
                               "--wrap", "true").stdout.strip().split(";")[0]
    slurm_cluster.wait_sacct(job_id, "COMPLETED", timeout=60)
    assert int(job_id) == int(first) + 1  # job ids continue: controller state was kept
