"""The prepare stage: a dataset kind's raw items -> every image validated (policy: fail, or quarantine and
go on), identities filtered, an identity-disjoint split, and the manifest in the planned stage directory."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from anonrisk.config.schema import DataConfig
from anonrisk.data.datasets import Dataset, DatasetContext, RawItem
from anonrisk.data.io import is_readable
from anonrisk.data.paths import check_record_id, check_unique_ids
from anonrisk.data.records import FaceRecord, read_manifest, write_manifest
from anonrisk.errors import ConfigError, DataError
from anonrisk.stages import StageDir, write_json

# bump when prepare's output for the same config changes
DATA_VERSION = 2  # 2: ids are relative paths with extension; the fingerprint holds the files' content
log = logging.getLogger("anonrisk")


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


def select_identities(items: list[RawItem], cfg: DataConfig, min_images: int | None = None
                      ) -> tuple[dict[str, list[RawItem]], dict[str, str], dict[str, int]]:
    """(images of each kept identity, identity -> split, dropped identity -> its image count): the filters
    and the identity-disjoint split, the same for ``prepare`` and for ``anonrisk validate``'s preview."""
    min_images = cfg.min_images_per_identity if min_images is None else min_images
    by_identity: dict[str, list[RawItem]] = defaultdict(list)
    for it in items:
        by_identity[it.identity].append(it)
    kept = sorted(k for k, v in by_identity.items() if len(v) >= min_images)
    dropped = {k: len(v) for k, v in sorted(by_identity.items()) if len(v) < min_images}
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
    return {k: by_identity[k] for k in kept}, split_of, dropped


def check_items(items: list[RawItem], where: str) -> None:
    """Every id a clean relative path, no two alike (a clash names both files)."""
    for it in items:
        check_record_id(it.id, f"{where}: {it.path}")
    check_unique_ids(items, where)


def prepare(cfg: DataConfig, dataset: Dataset, stage: StageDir, progress: bool = True) -> list[FaceRecord]:
    """Run (or reuse) the planned prepare stage of ``dataset``; returns the manifest's records."""
    root = _require_root(cfg) if dataset.needs_root else None
    with stage.lock():
        if stage.reuse(["manifest.jsonl"]):
            return read_manifest(stage / "manifest.jsonl", root)
        return _prepare(cfg, dataset, stage, root, progress)


def _prepare(cfg: DataConfig, dataset: Dataset, stage: StageDir, root: Path | None, progress: bool) -> list[FaceRecord]:
    from tqdm import tqdm

    stage.begin(cfg.model_dump())
    items = dataset.items(DatasetContext(root, stage / "images", cfg.image_size, progress))
    check_items(items, f"dataset {cfg.dataset!r}")
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
    min_images = cfg.min_images_per_identity if dataset.labeled else 1  # unlabeled: every image its own identity
    by_identity, split_of, dropped = select_identities(items, cfg, min_images)
    if dropped:
        log.info("prepare: %d identities with fewer than %d images dropped (%d images), e.g. %s", len(dropped),
                 min_images, sum(dropped.values()), ", ".join(list(dropped)[:3]))
    records = [
        FaceRecord(id=it.id, identity=ident, path=str(Path(it.path).absolute()), split=split_of[ident])
        for ident, its in by_identity.items()
        for it in its
    ]
    write_manifest(stage / "manifest.jsonl", records, root)
    counts = {s: sum(r.split == s for r in records) for s in ("train", "test", "aux")}
    extra = {} if dataset.labeled else {"labeled": False}
    extra.update(getattr(dataset, "prepare_summary", lambda: {})())  # e.g. the photos without a face
    stage.mark_done({"records": len(records), "identities": len(by_identity), "quarantined": len(bad), "split_records": counts,
                     "dropped_identities": {"count": len(dropped), "images": sum(dropped.values()),
                                            "min_images_per_identity": min_images, "first": list(dropped)[:20]}, **extra},
                    outputs=["manifest.jsonl"] + (["quarantine.json"] if dataset.needs_root else []))
    return records


def preview_records(cfg: DataConfig, dataset: Dataset, stage: StageDir) -> list[FaceRecord]:
    """The records prepare would make, from the dataset's listing alone (no image decoded, nothing written;
    every image counted as readable): ``anonrisk validate`` checks the attacks' needs (aux identities, a
    batch of distinct identities) against them. A finished stage's own manifest when there is one."""
    root = _require_root(cfg) if dataset.needs_root else None
    if stage.is_done():
        return read_manifest(stage / "manifest.jsonl", root, check=False)
    items = dataset.preview(DatasetContext(root, stage / "images", cfg.image_size, False))
    check_items(items, f"dataset {cfg.dataset!r}")
    by_identity, split_of, _ = select_identities(items, cfg, cfg.min_images_per_identity if dataset.labeled else 1)
    return [FaceRecord(id=it.id, identity=ident, path=it.path, split=split_of[ident]) for ident, its in by_identity.items() for it in its]
