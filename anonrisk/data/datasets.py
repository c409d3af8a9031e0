"""Dataset adapters and the ``prepare`` stage.

An adapter turns a dataset's real on-disk layout into raw items (identity, path, official split);
``prepare`` validates every image (policy: fail, or quarantine and go on), filters identities, makes an
identity-disjoint split and writes the manifest into a fingerprinted stage directory.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from anonrisk.config.schema import DataConfig
from anonrisk.data.io import is_readable, save_image
from anonrisk.data.records import FaceRecord, read_manifest, write_manifest
from anonrisk.errors import ConfigError, DataError
from anonrisk.registry import Registry
from anonrisk.stages import StageDir, fingerprint, write_json

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm"}
DATA_VERSION = 1  # bump when prepare's output for the same config changes


@dataclass(frozen=True)
class RawItem:
    id: str
    identity: str
    path: str
    official_split: Optional[str] = None


DATASETS: Registry[Callable[[Path], list[RawItem]]] = Registry("dataset")


def _require_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise ConfigError(f"data.root: dataset {cfg.dataset!r} needs a root directory")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root: dataset directory not found: {root}")
    return root


@DATASETS.register("celeba")
def celeba(root: Path) -> list[RawItem]:
    """CelebA as distributed: img_align_celeba/, identity_CelebA.txt, list_eval_partition.txt."""
    images = root / "img_align_celeba"
    ident_file = root / "identity_CelebA.txt"
    part_file = root / "list_eval_partition.txt"
    if not images.is_dir():
        raise DataError(f"CelebA: image folder not found: {images}")
    if not ident_file.exists():
        raise DataError(f"CelebA: identity file not found: {ident_file}")
    partition = {}
    if part_file.exists():
        for lineno, line in enumerate(part_file.read_text().splitlines(), 1):
            if line.strip():
                try:
                    name, p = line.split()
                    partition[name] = {"0": "train", "1": "aux", "2": "test"}[p]
                except (ValueError, KeyError):
                    raise DataError(f"{part_file}:{lineno}: expected '<image> <0|1|2>', got {line!r}") from None
    items = []
    for lineno, line in enumerate(ident_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"{ident_file}:{lineno}: expected '<image> <identity>', got {line!r}")
        name, ident = parts
        items.append(RawItem(id=Path(name).stem, identity=ident, path=str(images / name), official_split=partition.get(name)))
    return items


@DATASETS.register("folder")
def folder(root: Path) -> list[RawItem]:
    """Any folder-per-identity tree: ``root/<identity>/<image>``."""
    items = []
    for person in sorted(p for p in root.iterdir() if p.is_dir()):
        for img in sorted(person.iterdir()):
            if img.suffix.lower() in IMAGE_EXTS:
                items.append(RawItem(id=f"{person.name}/{img.stem}", identity=person.name, path=str(img)))
    return items


@DATASETS.register("lfw")
def lfw(root: Path) -> list[RawItem]:
    """LFW as distributed (``lfw/<Person_Name>/<Person_Name>_0001.jpg``); accepts the root or its parent."""
    if (root / "lfw").is_dir():
        root = root / "lfw"
    return folder(root)


def synthetic_items(cfg: DataConfig, out_dir: Path, progress: bool) -> list[RawItem]:
    """Render the synthetic dataset into ``out_dir`` (resuming: images already there are kept)."""
    from tqdm import tqdm

    from anonrisk.data.synthetic import render_image

    s = cfg.synthetic
    items = []
    todo = [(i, j) for i in range(s.identities) for j in range(s.images_per_identity)]
    for i, j in tqdm(todo, desc="render synthetic", disable=None if progress else True, leave=False):
        path = out_dir / f"id{i:05d}" / f"{j:03d}.png"
        if not path.exists():
            save_image(path, render_image(s.seed, i, j, cfg.image_size))
        items.append(RawItem(id=f"id{i:05d}_{j:03d}", identity=f"id{i:05d}", path=str(path)))
    return items


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


def data_fingerprint(cfg: DataConfig) -> str:
    d = cfg.model_dump()
    if cfg.dataset != "synthetic":
        d.pop("synthetic")
        d["root"] = str(Path(cfg.root).expanduser().resolve()) if cfg.root else None
    return fingerprint("data", DATA_VERSION, d)


def prepare(cfg: DataConfig, runs_dir: str, progress: bool = True) -> tuple[StageDir, list[FaceRecord]]:
    """Run (or reuse) the prepare stage; returns its directory and the manifest's records."""
    from tqdm import tqdm

    stage = StageDir(runs_dir, "prepare", data_fingerprint(cfg))
    if stage.is_done():
        return stage, read_manifest(stage / "manifest.jsonl")
    stage.begin(cfg.model_dump())

    if cfg.dataset == "synthetic":
        items = synthetic_items(cfg, stage / "images", progress)
        bad: list[dict] = []
    else:
        items = DATASETS.get(cfg.dataset, "data.dataset")(_require_root(cfg))
        bad = []
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
    kept = sorted(k for k, v in by_identity.items() if len(v) >= cfg.min_images_per_identity)
    if cfg.max_identities and len(kept) > cfg.max_identities:
        rng = np.random.default_rng(cfg.split.seed)
        kept = sorted(rng.choice(kept, cfg.max_identities, replace=False).tolist())
    if len(kept) < 3:
        raise DataError(
            f"dataset {cfg.dataset!r}: only {len(kept)} identities have >= {cfg.min_images_per_identity} images; "
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
    stage.mark_done({"records": len(records), "identities": len(kept), "quarantined": len(bad), "split_records": counts})
    return stage, records
