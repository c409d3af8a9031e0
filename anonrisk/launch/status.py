"""``anonrisk grid status``: per stage, how many nodes are done, queued or running (Slurm), failed, or not
submitted yet, and a table of it."""

from __future__ import annotations

from typing import Any

from anonrisk.launch.driver import results_state
from anonrisk.launch.grid import STAGES, GridPlan
from anonrisk.launch.slurm import in_queue, queued_jobs, sacct_states
from anonrisk.stages import read_json


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
                problems.append(f"{stage} {', '.join(n.cells)}: job {job} {finals.get(job, finals.get(job.split('_')[0], 'ended'))}, "
                                f"log {plan.grid_dir}/submitit/{job}_0_log.err")
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
