"""The anonymize stage: run one anonymizer over a manifest into ``runs/anonymize/<data_fp>/<anon_fp>/``.

Work is cut into shards of ``shard_size`` records (sorted by id). A shard is finished when its marker
``shards/<k>.json`` exists; inside a shard, a record is finished when its PNG exists (PNGs are written
atomically). A killed run therefore resumes at record granularity, and a rerun of a finished stage is free.
Both runners (this module's local one, ``ray_runner``) take one ``AnonymizeJob``, begin the stage with
``start_stage``, run ``run_shard`` per shard and end with ``finish_stage``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from anonrisk.anonymize.base import Anonymizer, ShardInfo
from anonrisk.config.schema import AnonymizeConfig, Spec
from anonrisk.data.io import load_batch, save_image
from anonrisk.data.records import FaceRecord, write_manifest
from anonrisk.errors import DataError
from anonrisk.stages import StageDir, read_json, record_seed, write_json

log = logging.getLogger("anonrisk")


@dataclass
class AnonymizeJob:
    """What a runner gets: one planned anonymize stage and everything it needs."""

    spec: Spec
    anonymizer: Anonymizer
    records: Sequence[FaceRecord]
    stage: StageDir
    image_size: int
    cfg: AnonymizeConfig
    progress: bool = True
    on_bad_image: str = "fail"  # data.on_bad_image: records the anonymizer cannot serve fail the stage, or are left out


def output_path(out_dir: Path, record: FaceRecord) -> Path:
    return Path(out_dir) / "images" / f"{record.id}.png"


def shard_marker(out_dir: Path, k: int) -> Path:
    """The marker of a finished shard: its ids and timings."""
    return Path(out_dir) / "shards" / f"{k:05d}.json"


def shard_records(records: Sequence[FaceRecord], shard_size: int) -> list[list[FaceRecord]]:
    ordered = sorted(records, key=lambda r: r.id)
    return [ordered[i : i + shard_size] for i in range(0, len(ordered), shard_size)]


def quarantined(out_dir: Path) -> set[str]:
    """The ids of the records the stage left out (``quarantine.json``: the anonymizer had no output for them)."""
    path = Path(out_dir) / "quarantine.json"
    return {q["id"] for q in read_json(path)} if path.exists() else set()


def _check_records(job: AnonymizeJob) -> list[FaceRecord]:
    """The records the anonymizer can serve; the others fail the stage (listed) or are quarantined."""
    bad = dict(job.anonymizer.unusable(job.records))
    if not bad:
        return list(job.records)
    listing = [{"id": i, "reason": why} for i, why in sorted(bad.items())]
    shown = "; ".join(f"{q['id']}: {q['reason']}" for q in listing[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
    if job.on_bad_image == "fail":
        write_json(job.stage / "unusable.json", listing)
        raise DataError(f"{job.spec.name}: no usable output for {len(bad)} of {len(job.records)} records ({shown}); all listed in "
                        f"{job.stage / 'unusable.json'}. Fix them, or set data.on_bad_image=quarantine to leave them out")
    write_json(job.stage / "quarantine.json", listing)
    log.warning("anonymize %s: %d records quarantined (%s); listed in %s", job.spec.name, len(bad), shown, job.stage / "quarantine.json")
    return [r for r in job.records if r.id not in bad]


def start_stage(job: AnonymizeJob) -> tuple[list[list[FaceRecord]], list[int]]:
    """Record what makes the stage (``config.json``), leave out (or fail on) records the anonymizer cannot serve,
    and cut the shards: (shards, the unfinished ones)."""
    job.stage.begin({"anonymizer": job.spec.model_dump(), "describe": job.anonymizer.describe(), "image_size": job.image_size,
                     "seed": job.cfg.seed})
    shards = shard_records(_check_records(job), job.cfg.shard_size)
    return shards, [k for k in range(len(shards)) if not shard_marker(job.stage.path, k).exists()]


def run_shard(
    anonymizer: Anonymizer,
    records: Sequence[FaceRecord],
    out_dir: Path,
    image_size: int,
    batch_size: int,
    seed: int,
    on_batch: Optional[Callable[[int], None]] = None,
    decoded: Optional[Mapping[str, np.ndarray]] = None,
    on_write: Optional[Callable[[FaceRecord], None]] = None,
    write_threads: int = 0,
    shard: Optional[int] = None,
) -> dict:
    """Anonymize the records of one shard that have no output yet; returns timing figures.

    ``decoded`` (record id -> image at ``image_size``) holds images a separate task already decoded;
    records it lacks are decoded here. ``on_write`` is told about every output written. With
    ``write_threads`` the PNGs are encoded and written by that many threads while the next batch runs (a
    512 px PNG takes tens of ms: written inline, it would idle a GPU); all are written before this returns.
    A ``per_shard`` anonymizer gets every record still to do in one call (``shard`` is its number)."""
    todo = [r for r in records if not output_path(out_dir, r).exists()]
    if anonymizer.per_shard:
        batch_size = max(1, len(todo))
    t0 = time.perf_counter()

    def write(r: FaceRecord, img: np.ndarray) -> None:
        save_image(output_path(out_dir, r), img)
        if on_write:
            on_write(r)

    pool = ThreadPoolExecutor(write_threads, thread_name_prefix="png") if write_threads > 0 else None
    writes: deque = deque()
    try:
        for i in range(0, len(todo), batch_size):
            batch = todo[i : i + batch_size]
            if decoded is not None and all(r.id in decoded for r in batch):
                images = np.stack([decoded[r.id] for r in batch])
            else:
                images = load_batch([r.path for r in batch], image_size)
            seeds = [record_seed(seed, r.id) for r in batch]
            if anonymizer.per_shard:
                out = anonymizer(images, seeds, shard=ShardInfo(batch, shard, Path(out_dir) / "log"))
            else:
                out = anonymizer(images, seeds)
            if out.shape != images.shape or out.dtype != np.uint8:
                raise RuntimeError(f"{type(anonymizer).__name__} returned {out.dtype} {out.shape} for {images.shape}")
            while len(writes) > 2 * batch_size:  # bound the images waiting in memory
                writes.popleft().result()
            for r, img in zip(batch, out):
                if pool is None:
                    write(r, img)
                else:
                    writes.append(pool.submit(write, r, img))
            if on_batch:
                on_batch(len(batch))
        while writes:
            writes.popleft().result()  # re-raises a failed write
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return {"records": len(records), "computed": len(todo), "seconds": time.perf_counter() - t0, "runtime": anonymizer.runtime()}


def finish_stage(stage: StageDir, records: Sequence[FaceRecord], summary: dict) -> None:
    """Write the anonymized manifest (same ids, identities and splits; paths to the outputs; quarantined
    records left out) and DONE."""
    left_out = quarantined(stage.path)
    records = [r for r in records if r.id not in left_out]
    missing = [r.id for r in records if not output_path(stage.path, r).exists()]
    if missing:
        raise RuntimeError(f"{stage}: {len(missing)} records have no output, e.g. {missing[:3]}")
    out = [FaceRecord(r.id, r.identity, str(output_path(stage.path, r)), r.split, {"source": r.path}) for r in records]
    write_manifest(stage / "manifest.jsonl", out)
    # every distinct way a worker ran it (a resumed or mixed-device stage can have several)
    runtimes = []
    for marker in sorted(stage.path.glob("shards/*.json")) if (stage.path / "shards").is_dir() else []:
        rt = read_json(marker).get("runtime")
        if rt is not None and rt not in runtimes:
            runtimes.append(rt)
    stage.mark_done({**summary, "runtime": runtimes, **({"quarantined": len(left_out)} if left_out else {})})


def anonymize_local(job: AnonymizeJob) -> StageDir:
    """Single-process runner: shards in order, skipping finished ones."""
    from tqdm import tqdm

    from anonrisk.devices import resolve_device

    stage, cfg = job.stage, job.cfg
    if stage.is_done():
        return stage
    device = resolve_device(cfg.device)
    shards, pending = start_stage(job)
    t0 = time.perf_counter()
    timings = []
    if pending:
        job.anonymizer.setup(device)
        with tqdm(total=sum(len(shards[k]) for k in pending), desc=f"anonymize {job.spec.name}", disable=None if job.progress else True,
                  leave=False) as bar:
            for k in pending:
                t = run_shard(job.anonymizer, shards[k], stage.path, job.image_size, cfg.batch_size, cfg.seed, bar.update,
                              write_threads=cfg.write_threads, shard=k)
                write_json(shard_marker(stage.path, k), {"ids": [r.id for r in shards[k]], **t})
                timings.append(t)
    computed = sum(t["computed"] for t in timings)
    summary = {"records": len(job.records), "computed": computed, "shards": len(shards), "seconds": time.perf_counter() - t0, "runner": "local"}
    finish_stage(stage, job.records, summary)
    return stage
