"""The prepare stage: a dataset kind's raw items -> every image validated (policy: fail, or quarantine and
go on), identities filtered, an identity-disjoint split, and the manifest in the planned stage directory."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from anonrisk.config.schema import DataConfig
from anonrisk.data.datasets import Dataset, DatasetContext, RawItem
from anonrisk.data.io import is_readable
from anonrisk.data.records import FaceRecord, read_manifest, write_manifest
from anonrisk.errors import ConfigError, DataError
from anonrisk.stages import StageDir, write_json

DATA_VERSION = 1  # bump when prepare's output for the same config changes


def _require_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise ConfigError(f"data.root: dataset {cfg.dataset!r} needs a root directory")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root: dataset directory not found: {root}")
    return root


def split_identities(identities: list[str], test_fraction: float, aux_fraction: float, seed: int) -> dict[str, str]:
    order = sorted(identities)
    np.random.default_rng(seed).shuffle(order)
    n_test = max(1, round(len(order) * test_fraction))
    n_aux = round(len(order) * aux_fraction)
    if n_test + n_aux >= len(order):
        raise ConfigError(
            f"data.split: {len(order)} identities leave none for training with test_fraction={test_fraction}, "
            f"aux_fraction={aux_fraction}"
        )
    return {ident: ("test" if k < n_test else "aux" if k < n_test + n_aux else "train") for k, ident in enumerate(order)}


def prepare(cfg: DataConfig, dataset: Dataset, stage: StageDir, progress: bool = True) -> list[FaceRecord]:
    """Run (or reuse) the planned prepare stage of ``dataset``; returns the manifest's records."""
    from tqdm import tqdm

    if stage.is_done():
        return read_manifest(stage / "manifest.jsonl")
    stage.begin(cfg.model_dump())

    root = _require_root(cfg) if dataset.needs_root else None
    items = dataset.items(DatasetContext(root, stage / "images", cfg.image_size, progress))
    bad: list[dict] = []
    if dataset.needs_root:  # files of a real dataset: check every image before anything uses it
        good = []
        for it in tqdm(items, desc=f"check {cfg.dataset} images", disable=None if progress else True, leave=False):
            reason = is_readable(it.path)
            if reason is None:
                good.append(it)
                continue
            if cfg.on_bad_image == "fail":
                raise DataError(
                    f"bad image {it.path} (record {it.id}): {reason}. "
                    "Fix or remove it, or set data.on_bad_image=quarantine to skip such images."
                )
            bad.append({"id": it.id, "path": it.path, "reason": reason})
        items = good
        write_json(stage / "quarantine.json", bad)

    if not items:
        raise DataError(f"dataset {cfg.dataset!r} at {cfg.root or stage.path}: no usable images found")

    by_identity: dict[str, list[RawItem]] = defaultdict(list)
    for it in items:
        by_identity[it.identity].append(it)
    min_images = cfg.min_images_per_identity if dataset.labeled else 1  # unlabeled: every image its own identity
    kept = sorted(k for k, v in by_identity.items() if len(v) >= min_images)
    if cfg.max_identities and len(kept) > cfg.max_identities:
        rng = np.random.default_rng(cfg.split.seed)
        kept = sorted(rng.choice(kept, cfg.max_identities, replace=False).tolist())
    if len(kept) < 3:
        raise DataError(
            f"dataset {cfg.dataset!r}: only {len(kept)} identities have >= {min_images} images; "
            "need at least 3 (train and test identities)"
        )

    if cfg.split.use_official:
        split_of = {}
        for ident in kept:
            splits = {it.official_split for it in by_identity[ident]}
            if None in splits or len(splits) != 1:
                raise DataError(f"data.split.use_official: identity {ident} has images in splits {sorted(map(str, splits))}")
            split_of[ident] = splits.pop()
    else:
        split_of = split_identities(kept, cfg.split.test_fraction, cfg.split.aux_fraction, cfg.split.seed)

    records = [
        FaceRecord(id=it.id, identity=ident, path=str(Path(it.path).resolve()), split=split_of[ident])
        for ident in kept
        for it in by_identity[ident]
    ]
    write_manifest(stage / "manifest.jsonl", records)
    counts = {s: sum(r.split == s for r in records) for s in ("train", "test", "aux")}
    extra = {} if dataset.labeled else {"labeled": False}
    extra.update(getattr(dataset, "prepare_summary", lambda: {})())  # e.g. the photos without a face
    stage.mark_done({"records": len(records), "identities": len(kept), "quarantined": len(bad), "split_records": counts, **extra})
    return records
