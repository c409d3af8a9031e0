"""Session fixtures that bring up real services on 127.0.0.1 for the tests in this folder.

- ``slurm_cluster``: a Slurm cluster with slurmdbd/MariaDB accounting (``slurm/cluster.sh``): this host as a
  2-CPU node (partition ``debug``, the default) and two fake-GPU nodes ``n1``, ``n2`` (partition ``gpu``:
  8 GRES GPUs, 128 CPUs, 1 TiB each; one slurmd per node, all on this host).
- ``mlflow_server``: an MLflow tracking server with a sqlite store (``slurm/mlflow_server.sh``).

Both install what is missing (the Debian packages need root; CI runs as root on a fresh Debian machine),
never skip, and always tear down by the PIDs the scripts recorded, also when a test or the start fails.
Teardown then checks that none of those PIDs is still alive.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "slurm" / "cluster.sh"
MLFLOW_SH = REPO / "slurm" / "mlflow_server.sh"

# Timings measured by the fixtures and tests, printed in the terminal summary.
TIMINGS: Dict[str, float] = {}

# Final states as sacct prints them (CANCELLED may carry " by <uid>").
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED")


def record_timing(name: str, seconds: float) -> None:
    TIMINGS[name] = round(seconds, 2)


@pytest.fixture(scope="session")
def timing():
    """timing(name, seconds): report a measured duration in the terminal summary."""
    return record_timing


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001
    if TIMINGS:
        terminalreporter.section("real-service timings (s)")
        for k, v in TIMINGS.items():
            terminalreporter.write_line(f"{k:<44} {v:>7.2f}")


def _run(cmd: Sequence[str], timeout: float, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


def _alive(pid: int) -> bool:
    """Alive and not a zombie (exited daemons can stay zombies here; kill -0 would say alive)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    # state is the field after the parenthesised command name
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _read_pids(run_dir: Path, names: Iterable[str]) -> Dict[str, int]:
    pids = {}
    for name in names:
        f = run_dir / f"{name}.pid"
        if f.is_file() and f.read_text().strip():
            pids[name] = int(f.read_text().strip())
    return pids


def _slurm_pids(run_dir: Path) -> Dict[str, int]:
    """The PIDs cluster.sh recorded: its daemons plus one slurmd per fake-GPU node (slurmd-n1.pid, ...)."""
    nodes = sorted(p.name[: -len(".pid")] for p in run_dir.glob("slurmd-*.pid"))
    return _read_pids(run_dir, [*DAEMONS, *nodes])


def _sourced_env(script: Path) -> Dict[str, str]:
    """The variables a client gets from `source script`: only those it sets or changes."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")}
    out = _run(["bash", "-c", 'set -a; . "$1" >/dev/null; env -0', "_", str(script)], timeout=10, env=base)
    assert out.returncode == 0, out.stderr
    env = dict(kv.split("=", 1) for kv in out.stdout.split("\0") if "=" in kv)
    return {k: v for k, v in env.items() if base.get(k) != v and k not in ("_", "SHLVL", "PWD", "OLDPWD")}


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------- Slurm
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")
GPU_NODES = 2  # fake-GPU nodes n1..n2 beside this host's node (ANONRISK_SLURM_GPU_NODES)


@dataclass
class SlurmCluster:
    dir: Path
    env: Dict[str, str]
    pids: Dict[str, int] = field(default_factory=dict)

    @property
    def partition(self) -> str:
        return self.env["ANONRISK_SLURM_PARTITION"]

    @property
    def max_array_size(self) -> int:
        return int(self.env["ANONRISK_SLURM_MAX_ARRAY_SIZE"])

    def client_env(self) -> Dict[str, str]:
        return {**os.environ, **self.env}

    def run(self, *args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """Run a Slurm client command (sbatch, sacct, scontrol, ...) against this cluster."""
        out = _run(args, timeout=timeout, env=self.client_env())
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(args)} -> rc {out.returncode}\n{out.stdout}\n{out.stderr}")
        return out

    def sacct_states(self, job_id: str) -> Dict[str, str]:
        """JobID -> State for the allocation lines of a job (array tasks as 'N_i')."""
        out = self.run("sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", str(job_id), check=False)
        states = {}
        for line in out.stdout.splitlines():
            if "|" in line:
                jid, state = line.split("|", 1)
                states[jid] = state.split()[0] if state else ""
        return states

    def wait_sacct(self, job_id: str, want: str = "COMPLETED", n: int = 1, timeout: float = 60) -> Dict[str, str]:
        """Poll sacct (not `sbatch --wait`, which polls slowly) until `n` records of the job are final;
        fail with diagnostics if they are not all `want`, or on timeout."""
        deadline = time.monotonic() + timeout
        states: Dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.sacct_states(job_id)
            final = {k: v for k, v in states.items() if v in FINAL_STATES}
            if len(final) >= n and len(final) == len(states):
                bad = {k: v for k, v in final.items() if v != want}
                assert not bad, f"job {job_id} ended {bad}\n{self.diagnostics(job_id)}"
                return final
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} not final after {timeout}s: {states}\n{self.diagnostics(job_id)}")

    def up_again(self) -> subprocess.CompletedProcess:
        """`cluster.sh up` on this (live) cluster dir: a restart on the same data, with new PIDs."""
        out = _run(["bash", str(CLUSTER_SH), "up", str(self.dir)], timeout=180, env=_cluster_env())
        self.pids = _slurm_pids(self.dir / "run")
        return out

    @staticmethod
    def alive(pid: int) -> bool:
        return _alive(pid)

    def diagnostics(self, job_id: Optional[str] = None) -> str:
        parts = [self.run("squeue", "-a", check=False).stdout]
        if job_id:
            parts.append(self.run("scontrol", "show", "job", str(job_id), check=False).stdout)
        parts.append("--- slurmctld.log\n" + _tail(self.dir / "log" / "slurmctld.log", 25))
        for log in sorted((self.dir / "log").glob("slurmd.*.log")):
            parts.append(f"--- {log.name}\n" + _tail(log, 15))
        return "\n".join(parts)


def _ensure_slurm_installed() -> None:
    """`cluster.sh install`: a quick no-op when every binary is there; apt-get otherwise (root only)."""
    t = time.monotonic()
    out = _run(["bash", str(CLUSTER_SH), "install"], timeout=900)
    if out.returncode != 0:
        pytest.fail(f"cluster.sh install failed (rc {out.returncode}); Slurm, munge and MariaDB are needed and "
                    f"installing them needs root:\n{out.stdout}\n{out.stderr}", pytrace=False)
    if "installing" in out.stdout:
        record_timing("slurm: apt install", time.monotonic() - t)


def _check_stopped(pids: Dict[str, int], what: str) -> None:
    deadline = time.monotonic() + 10
    left = {n: p for n, p in pids.items() if _alive(p)}
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = {n: p for n, p in left.items() if _alive(p)}
    assert not left, f"{what}: still alive after down: {left}"


def _cluster_env() -> Dict[str, str]:
    return {**os.environ, "ANONRISK_SLURM_GPU_NODES": str(GPU_NODES)}


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    _ensure_slurm_installed()
    d = tmp_path_factory.mktemp("slurm")
    pids: Dict[str, int] = {}
    t = time.monotonic()
    try:
        out = _run(["bash", str(CLUSTER_SH), "up", str(d)], timeout=180, env=_cluster_env())
        pids = _slurm_pids(d / "run")
        if out.returncode != 0:
            logs = "\n".join(f"--- {p.name}\n{_tail(p, 15)}" for p in sorted((d / "log").glob("*")))
            pytest.fail(f"cluster.sh up failed (rc {out.returncode}):\n{out.stdout}\n{out.stderr}\n{logs}",
                        pytrace=False)
        record_timing("slurm: cluster up", time.monotonic() - t)
        sys.stdout.write(out.stdout)
        cluster = SlurmCluster(dir=d, env=_sourced_env(d / "env.sh"), pids=pids)
        # submitit calls sbatch/sacct/scontrol with the process environment: point it at this cluster.
        with pytest.MonkeyPatch.context() as mp:
            for k, v in cluster.env.items():
                mp.setenv(k, v)
            yield cluster
    finally:
        pids = {**{f"{n}(first)": p for n, p in pids.items()}, **_slurm_pids(d / "run")}  # + restarts
        t = time.monotonic()
        down = _run(["bash", str(CLUSTER_SH), "down", str(d)], timeout=120)
        record_timing("slurm: cluster down", time.monotonic() - t)
        _check_stopped(pids, "slurm daemons")
        assert down.returncode == 0, f"cluster.sh down failed:\n{down.stdout}\n{down.stderr}"
        # The MariaDB files are ~100 MB; pytest keeps the last few temp dirs. Keep logs, drop the data.
        shutil.rmtree(d / "mysql" / "data", ignore_errors=True)


# --------------------------------------------------------------------------------------------- MLflow
@dataclass
class MlflowServer:
    dir: Path
    tracking_uri: str
    pid: int


def _mlflow_bin() -> str:
    cand = Path(sys.executable).parent / "mlflow"
    if cand.exists():
        return str(cand)
    found = shutil.which("mlflow")
    if not found:
        pytest.fail("the mlflow executable is not installed next to this Python nor on PATH", pytrace=False)
    return found


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    pid: Optional[int] = None
    t = time.monotonic()
    env = {**os.environ, "MLFLOW_BIN": _mlflow_bin()}
    try:
        out = _run(["bash", str(MLFLOW_SH), "up", str(d)], timeout=180, env=env)
        if (d / "mlflow.pid").exists():
            pid = int((d / "mlflow.pid").read_text())
        if out.returncode != 0:
            pytest.fail(f"mlflow_server.sh up failed (rc {out.returncode}):\n{out.stdout}\n{out.stderr}\n"
                        f"{_tail(d / 'mlflow.log')}", pytrace=False)
        record_timing("mlflow: server up (/health)", time.monotonic() - t)
        uri = _sourced_env(d / "mlflow.env")["MLFLOW_TRACKING_URI"]
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
            yield MlflowServer(dir=d, tracking_uri=uri, pid=pid)
    finally:
        group = (_process_group(pid) | {pid}) if pid is not None else set()  # the server and its workers
        down = _run(["bash", str(MLFLOW_SH), "down", str(d)], timeout=60, env=env)
        _check_stopped({f"mlflow[{p}]": p for p in group}, "mlflow server")
        assert down.returncode == 0, f"mlflow_server.sh down failed:\n{down.stdout}\n{down.stderr}"


def _process_group(pgid: int) -> set:
    out = _run(["ps", "-eo", "pid=,pgid="], timeout=10)
    return {int(a) for a, b in (line.split() for line in out.stdout.splitlines() if line.strip()) if int(b) == pgid}
