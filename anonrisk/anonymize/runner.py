"""The anonymize stage: run one anonymizer over a manifest into ``runs/anonymize/<data_fp>/<anon_fp>/``.

Work is cut into shards of ``shard_size`` records (sorted by id). A shard is finished when its marker
``shards/<k>.json`` exists; inside a shard, a record is finished when its PNG exists (PNGs are written
atomically). A killed run therefore resumes at record granularity, and a rerun of a finished stage is free.
``run_shard`` is the unit of work that the local runner and the Ray runner share.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from anonrisk.anonymize.base import Anonymizer
from anonrisk.config.schema import AnonymizeConfig, AnonymizerSpec
from anonrisk.data.io import load_batch, save_image
from anonrisk.data.records import FaceRecord, write_manifest
from anonrisk.stages import StageDir, fingerprint, read_json, record_seed, write_json


def output_path(out_dir: Path, record: FaceRecord) -> Path:
    return Path(out_dir) / "images" / f"{record.id}.png"


def shard_marker(out_dir: Path, k: int) -> Path:
    """The marker of a finished shard: its ids and timings."""
    return Path(out_dir) / "shards" / f"{k:05d}.json"


def shard_records(records: Sequence[FaceRecord], shard_size: int) -> list[list[FaceRecord]]:
    ordered = sorted(records, key=lambda r: r.id)
    return [ordered[i : i + shard_size] for i in range(0, len(ordered), shard_size)]


def anonymize_fingerprint(anonymizer: Anonymizer, image_size: int, cfg: AnonymizeConfig) -> str:
    # runner, batch size, shard size and device do not change the output (per-record seeds), so they
    # stay out of the fingerprint: a Ray run and a local run share their results.
    return fingerprint("anonymize", anonymizer.describe(), image_size, cfg.seed)


def anonymize_stage(runs_dir: str, data_fp: str, anonymizer: Anonymizer, image_size: int, cfg: AnonymizeConfig) -> StageDir:
    return StageDir(runs_dir, "anonymize", data_fp, anonymize_fingerprint(anonymizer, image_size, cfg))


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
) -> dict:
    """Anonymize the records of one shard that have no output yet; returns timing figures.

    ``decoded`` (record id -> image at ``image_size``) holds images a separate task already decoded;
    records it lacks are decoded here. ``on_write`` is told about every output written. With
    ``write_threads`` the PNGs are encoded and written by that many threads while the next batch runs (a
    512 px PNG takes tens of ms: written inline, it would idle a GPU); all are written before this returns."""
    todo = [r for r in records if not output_path(out_dir, r).exists()]
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
            out = anonymizer(images, [record_seed(seed, r.id) for r in batch])
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
    """Write the anonymized manifest (same ids, identities and splits; paths to the outputs) and DONE."""
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
    stage.mark_done({**summary, "runtime": runtimes})


def anonymize_local(
    spec: AnonymizerSpec,
    anonymizer: Anonymizer,
    records: Sequence[FaceRecord],
    stage: StageDir,
    image_size: int,
    cfg: AnonymizeConfig,
    device: str,
    progress: bool = True,
) -> StageDir:
    """Single-process runner: shards in order, skipping finished ones."""
    from tqdm import tqdm

    if stage.is_done():
        return stage
    stage.begin({"anonymizer": spec.model_dump(), "describe": anonymizer.describe(), "image_size": image_size, "seed": cfg.seed})
    shards = shard_records(records, cfg.shard_size)
    pending = [(k, s) for k, s in enumerate(shards) if not shard_marker(stage.path, k).exists()]
    t0 = time.perf_counter()
    timings = []
    if pending:
        anonymizer.setup(device)
        with tqdm(total=sum(len(s) for _, s in pending), desc=f"anonymize {spec.name}", disable=None if progress else True, leave=False) as bar:
            for k, shard in pending:
                t = run_shard(anonymizer, shard, stage.path, image_size, cfg.batch_size, cfg.seed, bar.update,
                              write_threads=cfg.write_threads)
                write_json(shard_marker(stage.path, k), {"ids": [r.id for r in shard], **t})
                timings.append(t)
    computed = sum(t["computed"] for t in timings)
    summary = {"records": len(records), "computed": computed, "shards": len(shards), "seconds": time.perf_counter() - t0, "runner": "local"}
    finish_stage(stage, records, summary)
    return stage
