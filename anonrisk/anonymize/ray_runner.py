"""The Ray runner of the anonymize stage: the shards of ``runner.py`` spread over a Ray cluster.

- The driver (this process) reads the records from the manifest, cuts the same shards as the local runner
  and skips those with a marker. For each pending shard a CPU task decodes and resizes the images that have
  no output yet (for GPU actors; CPU actors, which already fill the CPUs, decode themselves unless
  ``anonymize.ray.decode: tasks``); an actor runs ``run_shard`` on them.
- One actor per GPU (or per CPU slot) holds a loaded anonymizer (``setup`` once per actor life) and writes
  each output PNG atomically, then the shard marker, exactly as the local runner does; per-record seeds make
  the images identical. Actors also append one line per written output to ``log/writes-<node>-<pid>.jsonl``
  (an audit trail: which process wrote what, and when).
- Condition maps are not split off into CPU tasks: diffusion anonymizers compute them inside ``__call__``
  from the working-resolution image that they make on their own device, so the actor computes them (with
  the content-hash cache of ``conditioning.py``).
- Faults: a crashed actor is restarted by Ray (``max_restarts``) and its queued shards rerun on it
  (``max_task_retries``), skipping the outputs that already exist; an actor that stays dead is killed and
  replaced (``max_replacements``) and the driver sends its shards again. A killed driver leaves finished
  outputs and markers behind: a rerun redoes only what is missing.
- Outputs are written by the actors, so ``runs_dir`` (and the dataset) must be on storage that every node
  sees (one machine, NFS, a mounted bucket); an actor that cannot see the stage directory says so.

Connecting and sizing the pool: ``ray_connect.py``. Ray is imported inside functions only: the local runner
and the CLI work without it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

from anonrisk.anonymize.base import Anonymizer
from anonrisk.anonymize.ray_connect import connect, plan_workers
from anonrisk.anonymize.runner import AnonymizeJob, finish_stage, output_path, run_shard, shard_marker, start_stage
from anonrisk.config.schema import Spec
from anonrisk.data.records import FaceRecord
from anonrisk.errors import ConfigError
from anonrisk.stages import StageDir, write_json

log = logging.getLogger("anonrisk.ray")


# ---- the two kinds of remote work ----------------------------------------------------------------------


def decode_shard(paths: list[str], image_size: int) -> tuple[Any, float]:
    """CPU task: read and resize the images of one shard that have no output yet."""
    from anonrisk.data.io import load_batch

    t0 = time.perf_counter()
    images = load_batch(paths, image_size)
    return images, time.perf_counter() - t0


class ShardWorker:
    """Actor: one loaded anonymizer; runs shards and writes their outputs and markers."""

    def __init__(self, spec: dict, out_dir: str, image_size: int, batch_size: int, seed: int, device: str, write_threads: int = 0):
        self.spec, self.out_dir, self.write_threads = spec, Path(out_dir), write_threads
        self.image_size, self.batch_size, self.seed, self.device = image_size, batch_size, seed, device
        self.anonymizer: Optional[Anonymizer] = None
        self.setup_seconds = 0.0
        self.log_file = None
        self.log_lock = threading.Lock()

    def _ensure_setup(self) -> None:
        """Load the anonymizer once per actor life (again after a restart)."""
        if self.anonymizer is not None:
            return
        import ray

        t0 = time.perf_counter()
        self.node = ray.get_runtime_context().get_node_id()
        if not (self.out_dir / "config.json").exists():
            raise ConfigError(
                f"runs_dir: the stage directory {self.out_dir} is not visible on Ray node {self.node[:12]}; put runs_dir "
                f"(and the dataset) on storage that every node sees"
            )
        from anonrisk.anonymize import build_anonymizer
        from anonrisk.devices import resolve_device

        gpu = bool(ray.get_runtime_context().get_accelerator_ids().get("GPU"))
        device = "cuda" if gpu else ("cpu" if self.device == "auto" else self.device)
        self.device = device if device == "cpu" else resolve_device(device)  # (resolve_device imports torch)
        anonymizer = build_anonymizer(Spec(**self.spec))
        anonymizer.setup(self.device)
        self.anonymizer = anonymizer
        self.setup_seconds = time.perf_counter() - t0

    def start(self) -> dict:
        self._ensure_setup()
        return self.info()

    def info(self) -> dict:
        return {"pid": os.getpid(), "node": getattr(self, "node", None), "device": self.device, "setup_seconds": self.setup_seconds}

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

    def run(self, k: int, records: list[dict], todo_ids: list[str], decoded: Optional[tuple]) -> dict:
        """Run shard ``k``; ``decoded`` is a decode task's result, or None to decode here."""
        self._ensure_setup()
        images, decode_seconds = decoded if decoded is not None else ([], 0.0)
        recs = [FaceRecord.from_json(r) for r in records]
        t = run_shard(self.anonymizer, recs, self.out_dir, self.image_size, self.batch_size, self.seed,
                      decoded=dict(zip(todo_ids, images)) if decoded is not None else None, on_write=self._logged(k),
                      write_threads=self.write_threads, shard=k)
        marker = {"ids": [r.id for r in recs], **t, "decode_seconds": decode_seconds,
                  "worker": {"pid": os.getpid(), "node": self.node, "device": self.device}}
        write_json(shard_marker(self.out_dir, k), marker)
        return marker


# ---- the driver ----------------------------------------------------------------------------------------


def _cause(exc: BaseException) -> BaseException:
    """The user's exception inside a Ray task error (so a DataError reaches the CLI as itself)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class _Slot:
    """One actor position; ``generation`` counts replacements so errors from a replaced actor are ignored."""

    def __init__(self, index: int, actor, generation: int = 0):
        self.index, self.actor, self.generation = index, actor, generation
        self.ready_ref = actor.start.remote()
        self.ready = False
        self.queued = 0


def anonymize_ray(job: AnonymizeJob) -> StageDir:
    """Anonymize the job's records into its stage on a Ray cluster; same outputs and markers as ``anonymize_local``."""
    from tqdm import tqdm

    spec, anonymizer, records, stage, image_size, cfg, progress = (job.spec, job.anonymizer, job.records, job.stage, job.image_size,
                                                                   job.cfg, job.progress)
    if stage.is_done():
        return stage
    rc = cfg.ray
    ray, where, started = connect(rc)
    try:
        n_workers, gpw = plan_workers(ray.cluster_resources(), rc, anonymizer, where)
        # nothing is written before the cluster checks above have passed
        shards, unfinished = start_stage(job)
        pending = deque(unfinished)
        todo = {k: [r for r in shards[k] if not output_path(stage.path, r).exists()] for k in pending}
        n_workers = min(n_workers, max(1, len(pending)))
        decode_in_tasks = rc.decode == "tasks" or (rc.decode == "auto" and gpw > 0)
        t0, cpu0 = time.perf_counter(), time.process_time()
        first_ready = None
        markers: dict[int, dict] = {}
        infos: list[dict] = []
        redispatched = 0
        if pending:
            worker_cls = ray.remote(ShardWorker).options(
                num_cpus=rc.num_cpus_per_worker, num_gpus=gpw, max_restarts=rc.max_restarts, max_task_retries=rc.max_task_retries
            )
            decode = ray.remote(decode_shard).options(num_cpus=rc.num_cpus_per_decode, max_retries=3)
            args = (spec.model_dump(), str(stage.path.resolve()), image_size, cfg.batch_size, cfg.seed, cfg.device, cfg.write_threads)

            def new_slot(i: int, generation: int = 0) -> _Slot:
                return _Slot(i, worker_cls.remote(*args), generation)

            slots = [new_slot(i) for i in range(n_workers)]
            inflight: dict[Any, tuple[int, int, int]] = {}  # result ref -> (slot, generation, shard)
            replacements = 0
            warned = 0

            def replace(i: int, exc: BaseException) -> int:
                """Ray's restarts and retries of slot i's actor are used up: kill what is left of it, start a
                fresh one, and queue its shards again; returns how many shards were queued again."""
                nonlocal replacements
                s = slots[i]
                if replacements >= rc.max_replacements:
                    raise RuntimeError(f"anonymize {spec.name}: Ray actors keep dying ({replacements} replaced; "
                                       f"anonymize.ray.max_replacements={rc.max_replacements}): {exc}") from None
                replacements += 1
                log.warning("anonymize %s: actor %d died (%s); replacing it and sending its shards again",
                            spec.name, i, str(exc).splitlines()[0])
                ray.kill(s.actor, no_restart=True)
                again = [(ref, k) for ref, (j, g, k) in inflight.items() if j == i and g == s.generation]
                for ref, k in again:
                    del inflight[ref]
                    pending.appendleft(k)
                slots[i] = new_slot(i, s.generation + 1)
                return len(again)
            log.info("anonymize %s: %d shards on %d Ray actor(s) (GPU %g each) on %s", spec.name, len(pending), n_workers, gpw, where)
            bar = tqdm(total=sum(len(v) for v in todo.values()), desc=f"anonymize {spec.name} (ray)", disable=None if progress else True, leave=False)
            try:
                while pending or inflight:
                    for s in slots:
                        while s.ready and pending and s.queued < rc.prefetch_shards:
                            k = pending.popleft()
                            images = decode.remote([r.path for r in todo[k]], image_size) if decode_in_tasks else None
                            ref = s.actor.run.remote(k, [r.to_json() for r in shards[k]], [r.id for r in todo[k]], images)
                            inflight[ref] = (s.index, s.generation, k)
                            s.queued += 1
                    waiting = list(inflight) + [s.ready_ref for s in slots if not s.ready]
                    # short waits: Ctrl-C (KeyboardInterrupt) is only seen between them
                    done, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
                    if not done:
                        if not any(s.ready for s in slots) and time.perf_counter() - t0 > warned + 60:
                            warned += 60
                            log.warning("anonymize %s: no actor has started after %d s; waiting for cluster resources "
                                        "(each actor needs CPU=%g, GPU=%g)", spec.name, warned, rc.num_cpus_per_worker, gpw)
                        continue
                    ref = done[0]
                    starting = next((s for s in slots if not s.ready and s.ready_ref == ref), None)
                    if starting is not None:
                        try:
                            infos.append(ray.get(ref))
                        except ray.exceptions.RayTaskError as exc:  # setup failed: a config or data problem
                            raise _cause(exc) from None
                        except ray.exceptions.RayActorError as exc:  # the process died while loading
                            redispatched += replace(starting.index, exc)
                            continue
                        starting.ready = True
                        first_ready = first_ready or time.perf_counter() - t0
                        continue
                    i, generation, k = inflight.pop(ref)
                    try:
                        marker = ray.get(ref)
                    except ray.exceptions.RayActorError as exc:
                        pending.appendleft(k)
                        redispatched += 1 + replace(i, exc)
                        continue
                    except ray.exceptions.RayTaskError as exc:
                        raise _cause(exc) from None
                    slots[i].queued -= 1
                    markers[k] = marker
                    bar.update(marker["computed"])
            finally:
                bar.close()
                for s in slots:
                    ray.kill(s.actor, no_restart=True)
        seconds = time.perf_counter() - t0
        computed = sum(m["computed"] for m in markers.values())
        shard_seconds = [m["seconds"] for m in markers.values()]
        summary = {
            "records": len(records), "computed": computed, "shards": len(shards), "shards_run": len(markers),
            "seconds": seconds, "runner": "ray", "workers": n_workers, "num_gpus_per_worker": gpw,
            "setup_seconds": max((x["setup_seconds"] for x in infos), default=0.0),
            "first_ready_seconds": first_ready or 0.0,  # actor start + model setup before the first shard
            "driver_cpu_seconds": time.process_time() - cpu0,
            "images_per_second": computed / seconds if seconds > 0 and computed else 0.0,
            "shard_seconds": {"min": min(shard_seconds, default=0.0), "mean": sum(shard_seconds) / len(shard_seconds) if shard_seconds else 0.0,
                              "max": max(shard_seconds, default=0.0)},
            "decode": "tasks" if decode_in_tasks else "actor",
            "decode_seconds": sum(m["decode_seconds"] for m in markers.values()),  # in decode tasks
            "redispatched": redispatched,
            "worker_pids": sorted({m["worker"]["pid"] for m in markers.values()}),
        }
        finish_stage(stage, records, summary)
        return stage
    finally:
        if started:
            ray.shutdown()
