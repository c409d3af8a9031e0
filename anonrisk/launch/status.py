"""``anonrisk grid status``: per stage, how many nodes are done, queued or running (Slurm), failed, or not
submitted yet, and a table of it. Every node that ended without its DONE marker is named with its job,
its final state, the error its log ends with and the path of that log (submitit with ``folder=.../%j``
writes ``submitit/<job>/<job>_<rank>_log.err``; an array task's job is ``<array>_<task>``). A node whose
job never ran (cancelled because an upstream task failed) names the upstream failure instead."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from anonrisk.launch.driver import results_state
from anonrisk.launch.grid import STAGES, GridPlan, Node
from anonrisk.launch.slurm import in_queue, queued_jobs, sacct_states
from anonrisk.stages import read_json

_RANK = re.compile(r"_(\d+)_log\.err$")


def job_logs(grid_dir: Path, job_id: str) -> list[Path]:
    """The stderr logs a job's tasks wrote (one per rank of a multi-task job), in rank order."""
    from submitit.core.utils import JobPaths

    folder = JobPaths(grid_dir / "submitit" / "%j", job_id=job_id).folder
    logs = [p for p in folder.glob(f"{job_id}_*_log.err") if _RANK.search(p.name)]
    return sorted(logs, key=lambda p: int(_RANK.search(p.name).group(1)))


def error_line(text: str) -> Optional[str]:
    """The exception line a Python traceback ends with (the last traceback in the text), else None."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if not starts:
        return None
    for line in lines[starts[-1] + 1:]:
        if line.strip() and not line[:1].isspace():
            return line.strip()[:300]
    return None


def _tail(path: Path, size: int = 1 << 16) -> str:
    """The end of a log (a training's log can be long; the traceback is at its end)."""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode(errors="replace")


def failure(grid_dir: Path, job_id: str) -> tuple[Optional[Path], Optional[str]]:
    """(log, error): the first rank whose log holds a traceback, else rank 0's log; (None, None) when the
    job never wrote one."""
    logs = job_logs(grid_dir, job_id)
    for log in logs:
        err = error_line(_tail(log))
        if err:
            return log, err
    return (logs[0], None) if logs else (None, None)


def status(plan: GridPlan) -> dict[str, Any]:
    """Per stage: how many nodes are done, queued/running (Slurm), failed, or not submitted yet."""
    state_path = plan.grid_dir / "jobs.json"
    state = read_json(state_path) if state_path.exists() else {"nodes": {}, "collect": None}
    on_slurm = state.get("executor") == "slurm"
    queued = queued_jobs() if on_slurm else set()
    recorded = [rec["job_id"] for rec in state["nodes"].values()]
    finals = sacct_states(recorded + ([state["collect"]["job_id"]] if state.get("collect") else [])) if on_slurm else {}
    rows: dict[str, dict[str, int]] = {}
    problems = []
    roots: dict[str, list[str]] = {}  # failed node key -> the failures that ran and caused it (itself, or upstream)

    def upstream_failures(n: Node) -> list[str]:
        return sorted({r for d in n.deps for r in roots.get(d, [])})

    for stage in STAGES:
        counts = {"total": 0, "done": 0, "queued": 0, "failed": 0, "not submitted": 0}
        for n in plan.stage_nodes(stage):
            counts["total"] += 1
            job = state["nodes"].get(n.key, {}).get("job_id")
            if plan.is_done(n):
                counts["done"] += 1
            elif in_queue(job, queued):
                counts["queued"] += 1
            elif job:
                counts["failed"] += 1
                what = f"{stage} {', '.join(n.cells)}"
                ended = finals.get(job, finals.get(job.split("_")[0], "ended"))
                log, err = failure(plan.grid_dir, job)
                upstream = upstream_failures(n)
                if log is None and upstream:
                    problems.append(f"{what}: job {job} {ended}, never ran: upstream {'; '.join(upstream)} failed")
                    roots[n.key] = upstream
                else:
                    problems.append(f"{what}: job {job} {ended}" + (f": {err}" if err else "")
                                    + (f", log {log}" if log else ", no log (the job never started)"))
                    roots[n.key] = [f"{what} (job {job})"]
            else:
                counts["not submitted"] += 1
        rows[stage] = counts
    collect_job = (state.get("collect") or {}).get("job_id")
    return {"grid": plan.spec.name, "stages": rows, "problems": problems, "results_current": results_state(plan),
            "results_dir": str(plan.results_dir), "collect_job": collect_job,
            "collect_state": finals.get(collect_job) if collect_job else None}


def format_status(st: dict[str, Any]) -> str:
    head = f"{'stage':10s} {'total':>5s} {'done':>5s} {'queued':>6s} {'failed':>6s} {'not submitted':>13s}"
    lines = [f"grid {st['grid']}", head]
    for stage, c in st["stages"].items():
        lines.append(f"{stage:10s} {c['total']:5d} {c['done']:5d} {c['queued']:6d} {c['failed']:6d} {c['not submitted']:13d}")
    lines += [f"  ! {p}" for p in st["problems"]]
    res = st["results_current"]  # up to date, stale or incomplete
    res += ": anonrisk grid collect rewrites them" if res == "stale" else ""
    lines.append(f"results: {st['results_dir']} ({res})" + (f"; collect job {st['collect_job']} {st['collect_state'] or ''}" if st["collect_job"] else ""))
    return "\n".join(lines)
