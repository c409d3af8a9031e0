"""What Slurm still holds for this user: ``squeue`` (queued and running jobs, arrays expanded) and
``sacct`` (final states). No Slurm on PATH: nothing is queued."""

from __future__ import annotations

import getpass
import shutil
import subprocess
from typing import Optional

from anonrisk.errors import AnonriskError

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD", "REQUEUE_FED"}


def _task_ids(spec: str) -> set[int]:
    """``[0-3,7%2]`` -> {0, 1, 2, 3, 7}."""
    out: set[int] = set()
    for part in spec.strip("[]").split("%")[0].split(","):
        if "-" in part:
            a, b = part.split("-")
            out.update(range(int(a), int(b) + 1))
        elif part:
            out.add(int(part))
    return out


def queued_jobs() -> set[str]:
    """Job ids ("123", "124_5") of this user's jobs that Slurm still holds (pending, running, requeued)."""
    if not shutil.which("squeue"):
        return set()
    proc = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AnonriskError(f"squeue failed (is Slurm reachable?): {proc.stderr.strip()}")
    out: set[str] = set()
    for line in proc.stdout.split():
        base, _, task = line.partition("_")
        if task.startswith("["):
            out.update(f"{base}_{t}" for t in _task_ids(task))
        out.add(line if task and not task.startswith("[") else base)
    return out


def in_queue(job_id: Optional[str], queued: set[str]) -> bool:
    return bool(job_id) and job_id in queued


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    if not job_ids or not shutil.which("sacct"):
        return {}
    proc = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(sorted({j.split("_")[0] for j in job_ids}))],
                          capture_output=True, text=True, timeout=60)
    states = {}
    for line in proc.stdout.splitlines():
        jid, _, state = line.partition("|")
        states[jid] = state.split()[0] if state else ""
    return states
