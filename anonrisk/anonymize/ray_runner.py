"""The Ray runner of the anonymize stage: the shards of ``runner.py`` as a Ray Data pipeline.

- The driver (this process) cuts the same shards as the local runner and skips those with a marker. Each
  pending shard is one row (its records, and the ids that have no output yet), one block each.
- ``decode_shard`` (a CPU operator of tasks) reads and resizes the images without output; ``ShardWorker`` (a
  callable class on an autoscaling actor pool, ``ActorPoolStrategy(min_size, max_size)``, GPUs per actor)
  holds a loaded anonymizer (``setup`` once per actor life) and runs ``run_shard`` on each row: the same
  batches as the local runner, per-record seeds, each PNG written atomically, then the shard marker. So the
  images are byte-identical to the local runner's and a rerun or retry skips every record with an output.
  CPU actors, which already fill the CPUs, decode themselves unless ``anonymize.ray.decode: tasks``.
- Actors also append one line per written output to ``log/writes-<node>-<pid>.jsonl`` (an audit trail:
  which process wrote what, and when). The actor's result row is its shard marker; the driver only counts.
- Autoscaling: actors that do not fit the cluster are pending demand, which the autoscaler serves by
  starting nodes (GPU workers may start from zero); Ray Data grows the pool while shards wait.
- Faults: Ray restarts a dead actor (its node lost, OOM, SIGKILL) and reruns its shard; a lost decoded block
  is recomputed from its task. Writes are idempotent (outputs that exist are skipped), so nothing is lost or
  written twice. A killed driver leaves finished outputs and markers: a rerun redoes only what is missing.
- Outputs are written by the actors, so ``runs_dir`` (and the dataset) must be on storage that every node
  sees (one machine, NFS, a mounted bucket); an actor that cannot see the stage directory says so.

Connecting, sizing the pool and the actors' device: ``ray_connect.py``. Ray is imported inside functions
only: the local runner and the CLI work without it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from anonrisk.anonymize.ray_connect import PoolPlan, actor_device, connect, plan_pool
from anonrisk.anonymize.runner import AnonymizeJob, finish_stage, output_path, run_shard, shard_marker, start_stage
from anonrisk.config.schema import RayConfig, Spec
from anonrisk.data.records import FaceRecord
from anonrisk.errors import AnonriskError, ConfigError
from anonrisk.stages import StageDir, write_json

log = logging.getLogger("anonrisk.ray")


# ---- the two operators ---------------------------------------------------------------------------------


def decode_shard(batch: dict, image_size: int) -> dict:
    """CPU operator: read and resize the images of one shard's row that have no output yet."""
    from anonrisk.data.io import load_batch

    t0 = time.perf_counter()
    paths = json.loads(batch["paths"][0])
    images = load_batch(paths, image_size) if paths else np.zeros((0, image_size, image_size, 3), np.uint8)
    return {**{k: batch[k] for k in ("shard", "records", "todo")}, "images": images[None], "decode_seconds": np.array([time.perf_counter() - t0])}


class ShardWorker:
    """A pool actor: one loaded anonymizer; runs shards and writes their outputs and markers."""

    def __init__(self, spec: dict, out_dir: str, image_size: int, batch_size: int, seed: int, device: str, write_threads: int = 0):
        import ray

        self.out_dir, self.write_threads = Path(out_dir), write_threads
        self.image_size, self.batch_size, self.seed = image_size, batch_size, seed
        t0 = time.perf_counter()
        ctx = ray.get_runtime_context()
        self.node = ctx.get_node_id()
        if not (self.out_dir / "config.json").exists():
            raise ConfigError(
                f"runs_dir: the stage directory {self.out_dir} is not visible on Ray node {self.node[:12]}; put runs_dir "
                f"(and the dataset) on storage that every node sees"
            )
        from anonrisk.anonymize import build_anonymizer

        self.anonymizer = build_anonymizer(Spec(**spec))

        def cuda() -> bool:
            import torch

            return torch.cuda.is_available()

        self.gpu_ids = list(ctx.get_accelerator_ids().get("GPU", []))
        self.device = actor_device(device, self.anonymizer.device_kind, self.gpu_ids, cuda, self.node)
        self.anonymizer.setup(self.device)
        self.setup_seconds = time.perf_counter() - t0
        self.ready_at = time.time()  # wall clock: the driver compares it with its own start
        self.log_file = None
        self.log_lock = threading.Lock()

    def _logged(self, shard: int):
        if self.log_file is None:
            path = self.out_dir / "log" / f"writes-{self.node[:8]}-{os.getpid()}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.log_file = open(path, "a", buffering=1)

        def on_write(r: FaceRecord) -> None:  # from the writer threads: one whole line per call
            line = json.dumps({"id": r.id, "shard": shard, "t": time.time()}) + "\n"
            with self.log_lock:
                self.log_file.write(line)

        return on_write

    def __call__(self, batch: dict) -> dict:
        """One shard (a batch of one row); decoded images come with it, or are decoded here."""
        k = int(batch["shard"][0])
        records = [FaceRecord.from_json(r) for r in json.loads(batch["records"][0])]
        decoded = None
        if "images" in batch:
            decoded = dict(zip(json.loads(batch["todo"][0]), batch["images"][0]))
        cpu0 = time.thread_time()  # this thread's CPU (the writer threads' not included)
        t = run_shard(self.anonymizer, records, self.out_dir, self.image_size, self.batch_size, self.seed, decoded=decoded,
                      on_write=self._logged(k), write_threads=self.write_threads, shard=k)
        marker = {"ids": [r.id for r in records], **t, "cpu_seconds": time.thread_time() - cpu0,
                  "decode_seconds": float(batch["decode_seconds"][0]) if decoded is not None else 0.0,
                  "worker": {"pid": os.getpid(), "node": self.node, "device": self.device, "gpu_ids": self.gpu_ids,
                             "setup_seconds": self.setup_seconds, "ready_at": self.ready_at}}
        write_json(shard_marker(self.out_dir, k), marker)
        return {"shard": np.array([k]), "marker": np.array([json.dumps(marker, default=str)])}


# ---- the driver ----------------------------------------------------------------------------------------


def _user_error(exc: BaseException) -> Optional[AnonriskError]:
    """Our own error (a bad image, a config problem) inside whatever Ray wrapped it in, if it is one."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, AnonriskError):
            return exc
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else (exc.__cause__ or exc.__context__)
    return None


def _configure(ctx, rc: RayConfig) -> None:
    """This pipeline's Ray Data settings (the dataset's own DataContext: the process's stays as it was)."""
    ctx.enable_progress_bars = False  # the runner's own bar counts records
    ctx.print_on_execution_start = False
    ctx.wait_for_min_actors_s = int(max(1, rc.wait_for_workers_s))
    ctx.max_consecutive_actor_init_deaths = rc.max_replacements
    ctx.raise_original_map_exception = True


def build_dataset(ray, job: AnonymizeJob, shards: list, pending: list[int], pool: PoolPlan, decode_in_tasks: bool):
    stage, cfg, rc = job.stage, job.cfg, job.cfg.ray
    rows = []
    for k in pending:
        todo = [r for r in shards[k] if not output_path(stage.path, r).exists()]
        rows.append({"shard": k, "records": json.dumps([r.to_json() for r in shards[k]]), "todo": json.dumps([r.id for r in todo]),
                     "paths": json.dumps([r.path for r in todo])})
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    _configure(ds.context, rc)
    if decode_in_tasks:
        ds = ds.map_batches(decode_shard, batch_size=1, num_cpus=rc.num_cpus_per_decode, fn_kwargs={"image_size": job.image_size})
    compute = ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size, initial_size=pool.initial_size,
                                         max_tasks_in_flight_per_actor=rc.prefetch_shards,
                                         # the queued shards' input and output formatting overlap the running one (the
                                         # anonymizer itself still runs one shard at a time per actor)
                                         max_concurrent_calls_per_actor=rc.prefetch_shards)
    kwargs = {"spec": job.spec.model_dump(), "out_dir": str(stage.path.resolve()), "image_size": job.image_size, "batch_size": cfg.batch_size,
              "seed": cfg.seed, "device": cfg.device, "write_threads": cfg.write_threads}
    return ds.map_batches(ShardWorker, batch_size=1, compute=compute, num_gpus=pool.gpus or None, num_cpus=pool.cpus,
                          fn_constructor_kwargs=kwargs)


def anonymize_ray(job: AnonymizeJob) -> StageDir:
    """Anonymize the job's records into its stage on a Ray cluster; same outputs and markers as ``anonymize_local``."""
    from tqdm import tqdm

    stage, cfg = job.stage, job.cfg
    if stage.is_done():
        return stage
    rc = cfg.ray
    conn = connect(rc)
    ray = conn.ray
    try:
        shards, pending = start_stage(job)
        pool = plan_pool(ray.cluster_resources(), rc, job.anonymizer, len(pending))
        decode_in_tasks = rc.decode == "tasks" or (rc.decode == "auto" and pool.gpus > 0)
        t0, cpu0, wall0 = time.perf_counter(), time.process_time(), time.time()
        markers: dict[int, dict] = {}
        first_output = None
        if pending:
            log.info("anonymize %s: %d shards on %s, on %s", job.spec.name, len(pending), pool.describe(), conn.where)
            ds = build_dataset(ray, job, shards, pending, pool, decode_in_tasks)
            total = sum(len(shards[k]) for k in pending)
            with tqdm(total=total, desc=f"anonymize {job.spec.name} (ray)", disable=None if job.progress else True, leave=False) as bar:
                try:
                    for row in ds.iter_rows():
                        k = int(row["shard"])
                        if k in markers:  # a shard rerun after a fault reports twice
                            continue
                        markers[k] = json.loads(row["marker"])
                        first_output = first_output or time.perf_counter() - t0
                        bar.update(markers[k]["records"])
                except ray.exceptions.GetTimeoutError:
                    raise ConfigError(
                        f"anonymize {job.spec.name}: no Ray actor started within anonymize.ray.wait_for_workers_s={rc.wait_for_workers_s:g} s; "
                        f"each needs CPU={pool.cpus:g}, GPU={pool.gpus:g} (anonymize.ray.num_cpus_per_worker, num_gpus_per_worker) and "
                        f"{conn.where} has {_resources(ray)}; give it nodes that fit (an autoscaler may still be starting them: raise "
                        f"wait_for_workers_s), or ask for less"
                    ) from None
                except Exception as exc:
                    mine = _user_error(exc)
                    if mine is not None:
                        raise mine from None
                    raise
        summary = _summary(job, shards, markers, pool, decode_in_tasks, conn, time.perf_counter() - t0, time.process_time() - cpu0, first_output,
                           wall0)
        finish_stage(stage, job.records, summary)
        return stage
    finally:
        if conn.started:
            ray.shutdown()


def _resources(ray) -> str:
    r = ray.cluster_resources()
    return f"CPU={r.get('CPU', 0):g}, GPU={r.get('GPU', 0):g}"


def _summary(job, shards, markers, pool: PoolPlan, decode_in_tasks, conn, seconds, driver_cpu, first_output, wall0) -> dict[str, Any]:
    computed = sum(m["computed"] for m in markers.values())
    shard_seconds = [m["seconds"] for m in markers.values()]
    workers = {(m["worker"]["node"], m["worker"]["pid"]): m["worker"] for m in markers.values()}
    return {
        "records": len(job.records), "computed": computed, "shards": len(shards), "shards_run": len(markers),
        "seconds": seconds, "runner": "ray", "connected": conn.where,
        "pool": {"min": pool.min_size, "max": pool.max_size, "initial": pool.initial_size, "num_gpus_per_worker": pool.gpus,
                 "num_cpus_per_worker": pool.cpus},
        "workers": len(workers), "num_gpus_per_worker": pool.gpus,
        "nodes": len({node for node, _ in workers}),
        "setup_seconds": max((w["setup_seconds"] for w in workers.values()), default=0.0),
        "first_output_seconds": first_output or 0.0,  # pool start, model setup and the first shard
        # the first actor ready to work (process start and model setup): what one stage pays once
        "first_ready_seconds": max(0.0, min((w.get("ready_at", wall0) for w in workers.values()), default=wall0) - wall0),
        "driver_cpu_seconds": driver_cpu,
        "images_per_second": computed / seconds if seconds > 0 and computed else 0.0,
        "shard_seconds": {"min": min(shard_seconds, default=0.0), "mean": sum(shard_seconds) / len(shard_seconds) if shard_seconds else 0.0,
                          "max": max(shard_seconds, default=0.0)},
        "decode": "tasks" if decode_in_tasks else "actor",
        "decode_seconds": sum(m["decode_seconds"] for m in markers.values()),  # in decode tasks
        "shard_cpu_seconds": sum(m.get("cpu_seconds", 0.0) for m in markers.values()),  # the actors' CPU inside run_shard
        "worker_pids": sorted({pid for _, pid in workers}),
    }
