"""``anonrisk grid submit|status``: the stage graph onto an executor with submitit.

- ``slurm``: per stage, one job array per group of nodes that share their upstream tasks, each task
  depending on exactly those (``afterok:<array>_<task>``, or ``aftercorr:<array>`` when a stage maps 1:1 onto
  an upstream array; killed if a dependency fails), so a failed task costs only its own descendants. Then a
  collect job after every evaluation (``afterany``, so it reports failed cells). The submitter returns at
  once; Slurm runs the graph.
- ``local``: the same jobs as local processes (submitit's LocalExecutor), stage by stage, waiting.
- ``debug``: in this process, stage by stage (submitit's DebugExecutor): for tests and pdb.

A node whose stage directory is DONE is never submitted; on Slurm neither is a node whose job is still
queued or running, so submitting a grid twice submits nothing the second time. Job ids live in
``<runs_dir>/grids/<grid>/jobs.json`` (read by ``status.py``); submitit's logs beside them. Either way the
summary names the jobs submitted per stage.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from typing import Any, Optional

from anonrisk.errors import AnonriskError, ConfigError
from anonrisk.launch.grid import STAGES, GridPlan, Node
from anonrisk.launch.slurm import in_queue, queued_jobs
from anonrisk.stages import read_json, write_json

log = logging.getLogger("anonrisk")
EXECUTORS = ("slurm", "local", "debug")


# ---- submission ----------------------------------------------------------------------------------------
def _executor(plan: GridPlan, kind: str, stage: str, dependency: Optional[str] = None):
    import submitit

    res = plan.resources[stage]
    prof = plan.profile
    folder = plan.grid_dir / "submitit" / "%j"
    ex = submitit.AutoExecutor(folder=folder, cluster=kind, slurm_max_num_timeout=prof.max_requeues) if kind == "slurm" else \
        submitit.AutoExecutor(folder=folder, cluster=kind)
    params: dict[str, Any] = {
        "name": f"anonrisk-{plan.spec.name}-{stage}",
        "timeout_min": res.time_min,
        "cpus_per_task": res.cpus,
        "gpus_per_node": res.gpus,
        "nodes": res.nodes,
        "tasks_per_node": res.tasks_per_node,
    }
    if res.mem_gb:
        params["mem_gb"] = res.mem_gb
    if kind == "slurm":
        params.update(slurm_array_parallelism=prof.array_parallelism, slurm_signal_delay_s=prof.signal_delay_s,
                      slurm_setup=list(prof.setup), slurm_additional_parameters={"kill-on-invalid-dep": "yes"})
        optional = {"slurm_dependency": dependency, "slurm_account": prof.account, "slurm_qos": prof.qos,
                    "slurm_partition": res.partition or prof.partition}
        params.update({k: v for k, v in optional.items() if v})
    ex.update_parameters(**params)
    return ex


def _chunks(nodes: list[Node], size: int) -> list[list[Node]]:
    return [nodes[i : i + size] for i in range(0, len(nodes), size)]


def _submit_nodes(plan: GridPlan, kind: str, stage: str, nodes: list[Node], dependency: Optional[str], max_array: int) -> list:
    from anonrisk.launch.jobs import StageJob

    jobs = []
    for chunk in _chunks(nodes, max_array):
        ex = _executor(plan, kind, stage, dependency)
        cfgs = [plan.cell(n.cell).config.model_dump(mode="json") for n in chunk]
        jobs += ex.map_array(StageJob(), [stage] * len(chunk), cfgs, [str(plan.grid_dir)] * len(chunk),
                             [n.cell for n in chunk], [n.cells for n in chunk], [n.attack for n in chunk])
    return jobs


def dependency_groups(group_nodes: list[Node], live: dict[str, str], arrays: dict[str, list[str]]) -> list[tuple[Optional[str], list[Node]]]:
    """One stage's nodes as (Slurm dependency, nodes) groups: one array (or job) per group, so that each
    task waits only for its own upstream tasks and a failed task cancels only its own descendants.

    A Slurm array has one dependency for all its tasks, so the nodes are grouped by the exact upstream
    tasks they need (``afterok:<array>_<task>:...``): the trainings of one anonymization form one array.
    Where every task of an array submitted now has exactly one downstream node that needs nothing else (the
    evaluations after the trainings), those nodes form one array in the upstream's task order with
    ``aftercorr:<array>`` (task i after task i). ``live``: node key -> queued job id; ``arrays``: array id
    submitted now -> its tasks' node keys in task order."""
    by_deps: dict[tuple[str, ...], list[Node]] = {}
    for n in group_nodes:
        by_deps.setdefault(tuple(sorted({live[d] for d in n.deps if d in live})), []).append(n)
    groups: list[tuple[Optional[str], list[Node]]] = []
    one_to_one: dict[str, dict[int, Node]] = {}  # upstream array -> task -> its only downstream node
    for deps, group in by_deps.items():
        array, _, task = deps[0].partition("_") if len(deps) == 1 else ("", "", "")
        if len(group) == 1 and array in arrays and task:
            one_to_one.setdefault(array, {})[int(task)] = group[0]
        else:
            groups.append((f"afterok:{':'.join(deps)}" if deps else None, group))
    for array, tasks in one_to_one.items():
        if sorted(tasks) == list(range(len(arrays[array]))):
            groups.append((f"aftercorr:{array}", [tasks[i] for i in range(len(tasks))]))
        else:
            groups += [(f"afterok:{array}_{i}", [n]) for i, n in sorted(tasks.items())]
    return groups


def results_state(plan: GridPlan) -> str:
    """``up to date`` only when results/<grid>/metrics.json holds every cell with the result its finished
    stage holds now; ``stale`` when a cell's result differs (redone, or another run's); else ``incomplete``."""
    path = plan.results_dir / "metrics.json"
    try:
        doc = read_json(path)
    except (OSError, ValueError):
        return "incomplete"
    stored = {c.get("id"): c.get("result") for c in doc.get("cells", []) if isinstance(c, dict)}
    for cell in plan.cells:
        node = plan.nodes[plan.cell_nodes[cell.id]["evaluate"]]
        result = plan.runs_dir / node.key / "result.json"
        if cell.id in stored and plan.is_done(node) and result.exists() and read_json(result) != stored[cell.id]:
            return "stale"
    if doc.get("missing") or set(stored) != {c.id for c in plan.cells}:
        return "incomplete"
    return "up to date"


def results_current(plan: GridPlan) -> bool:
    return results_state(plan) == "up to date"


def submit(plan: GridPlan, kind: str, overrides: dict[str, Any], wait: bool = False) -> dict[str, Any]:
    """Submit what is neither done nor queued; returns {"submitted": {stage: [job ids]}, ...}."""
    if kind not in EXECUTORS:
        raise ConfigError(f"--executor {kind!r}: expected one of {', '.join(EXECUTORS)}")
    if kind == "slurm" and not shutil.which("sbatch"):
        raise ConfigError("--executor slurm: sbatch is not on PATH (use --executor local or debug off a cluster)")
    state_path = plan.grid_dir / "jobs.json"
    state = read_json(state_path) if state_path.exists() else {"nodes": {}, "collect": None}
    queued = queued_jobs() if kind == "slurm" else set()
    todo = {s: [n for n in plan.stage_nodes(s) if not plan.is_done(n) and not in_queue(state["nodes"].get(n.key, {}).get("job_id"), queued)]
            for s in STAGES}
    collect_queued = kind == "slurm" and in_queue((state.get("collect") or {}).get("job_id"), queued)
    need_collect = (any(todo.values()) or not results_current(plan)) and not collect_queued
    summary: dict[str, Any] = {"grid": plan.spec.name, "executor": kind, "submitted": {}, "cells": len(plan.cells),
                               "nodes": {s: len(plan.stage_nodes(s)) for s in STAGES}}
    if not any(todo.values()) and not need_collect:
        summary["message"] = (f"nothing to submit: {len(plan.cells)} cells, every stage done or queued"
                              + (f"; results in {plan.results_dir}" if results_current(plan) else ""))
        return summary

    from anonrisk.tracking.grid_mlflow import start_grid_runs

    plan.grid_dir.mkdir(parents=True, exist_ok=True)
    start_grid_runs(plan)  # the experiment and the runs exist before any job may log
    state["executor"] = kind
    try:
        if kind == "slurm":
            _submit_slurm(plan, todo, state, queued, overrides, need_collect, summary)
        else:
            _run_in_order(plan, kind, todo, state, overrides, summary)
    finally:  # what was submitted before a failure stays known: no duplicate on the next submit
        write_json(state_path, state)
    if wait and kind == "slurm":
        wait_for(state, summary)
    return summary


@contextlib.contextmanager
def _job_env_hidden():
    """submitit's clean_env, but keeping SLURM_CONF: it says which cluster to talk to, not which job."""
    import submitit

    conf = os.environ.get("SLURM_CONF")
    with submitit.helpers.clean_env():
        if conf:
            os.environ["SLURM_CONF"] = conf
        try:
            yield
        finally:
            os.environ.pop("SLURM_CONF", None)  # clean_env puts the original back


def _submit_slurm(plan, todo, state, queued, overrides, need_collect, summary) -> None:
    from anonrisk.launch.jobs import CollectJob
    from anonrisk.launch.profile import slurm_max_array_size

    max_array = slurm_max_array_size(plan.profile)
    live: dict[str, str] = {}  # node key -> job id that is queued (from before) or submitted now
    arrays: dict[str, list[str]] = {}  # array id submitted now -> its tasks' node keys, in task order
    for key, rec in state["nodes"].items():
        if in_queue(rec.get("job_id"), queued):
            live[key] = rec["job_id"]
    with _job_env_hidden():  # a driver inside a Slurm job must not pass its allocation on
        for stage in STAGES:
            nodes = todo[stage]
            if not nodes:
                continue
            submitted: list[str] = []
            for dependency, group in dependency_groups(group_nodes=nodes, live=live, arrays=arrays):
                jobs = _submit_nodes(plan, "slurm", stage, group, dependency, max_array)
                for n, job in zip(group, jobs):
                    live[n.key] = job.job_id
                    state["nodes"][n.key] = {"stage": stage, "job_id": job.job_id, "cells": n.cells, "submitted": time.time(),
                                             "dependency": dependency}
                    if "_" in job.job_id:
                        arrays.setdefault(job.job_id.split("_")[0], []).append(n.key)
                submitted += [j.job_id.split("_")[0] for j in jobs]
            summary["submitted"][stage] = sorted(set(submitted), key=submitted.index)
        if need_collect:
            evals = sorted({live[n.key].split("_")[0] for n in plan.stage_nodes("evaluate") if n.key in live})
            ex = _executor(plan, "slurm", "collect", f"afterany:{':'.join(evals)}" if evals else None)
            job = ex.submit(CollectJob(), str(plan.path), overrides)
            state["collect"] = {"job_id": job.job_id, "submitted": time.time()}
            summary["submitted"]["collect"] = [job.job_id]
    summary["jobs"] = state


def _run_in_order(plan, kind, todo, state, overrides, summary) -> None:
    """local/debug: each stage's jobs run (local: as processes, ``array_parallelism`` at a time) and are
    waited for before the next stage; a failure stops the grid with the cells it concerns."""
    from anonrisk.launch.collect import collect

    width = plan.profile.array_parallelism if kind == "local" else 1 << 30
    for stage in STAGES:
        nodes = todo[stage]
        if not nodes:
            continue
        failed = []
        for chunk in _chunks(nodes, width):
            jobs = _submit_nodes(plan, kind, stage, chunk, None, len(chunk))
            for n, job in zip(chunk, jobs):
                state["nodes"][n.key] = {"stage": stage, "job_id": job.job_id, "cells": n.cells, "submitted": time.time()}
                try:
                    job.result()
                except Exception as exc:  # noqa: BLE001 - reported with the cells it concerns
                    failed.append(f"{stage} of {', '.join(n.cells)}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}")
        summary["submitted"][stage] = [str(state["nodes"][n.key]["job_id"]) for n in nodes]
        if failed:
            raise AnonriskError(f"grid {plan.spec.name}: {len(failed)} {stage} job(s) failed (logs under {plan.grid_dir}/submitit):\n  "
                                + "\n  ".join(failed))
    summary["collect"] = collect(plan, strict=True)


def wait_for(state: dict[str, Any], summary: dict[str, Any], poll_s: float = 5.0, timeout_s: float = 7 * 86400) -> None:
    """Poll squeue (``sbatch --wait`` polls slowly) until none of the grid's jobs is queued."""
    ids = {rec["job_id"] for rec in state["nodes"].values()} | ({state["collect"]["job_id"]} if state.get("collect") else set())
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if not any(in_queue(j, queued_jobs()) for j in ids):
            return
        time.sleep(poll_s)
    raise AnonriskError(f"grid {summary['grid']}: still queued after {timeout_s:.0f} s")
