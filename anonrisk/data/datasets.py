"""Dataset kinds: each turns a dataset's real on-disk layout into raw items (record id, identity, path,
official split). ``prepare.py`` (the prepare stage) validates, filters and splits them.

A record id is the image's POSIX path relative to the dataset root, extension included (``paths.record_id``);
paths read from a dataset's own index files go through ``paths.join_under``, which refuses ``../``.

Add a kind in one file: a ``Dataset`` subclass with a pydantic ``Params`` model (its settings, given in the
config's ``data.<kind>:`` section), registered with ``@DATASETS.register("name")`` (see docs/architecture.md).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

from pydantic import Field

from anonrisk.config.validation import Strict
from anonrisk.data.paths import join_under, record_id
from anonrisk.errors import DataError
from anonrisk.registry import Kind, Registry

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class RawItem:
    id: str
    identity: str
    path: str
    official_split: Optional[str] = None


@dataclass(frozen=True)
class DatasetContext:
    """What a dataset kind sees: its root (``data.root``), a folder of its own inside the prepare stage
    (for data it makes, e.g. rendered images), the image size, and whether to show progress."""

    root: Optional[Path]
    out_dir: Path
    image_size: int
    progress: bool = True


class Dataset(Kind, abc.ABC):
    #: whether it reads ``data.root`` (its resolved path then enters the data fingerprint)
    needs_root: ClassVar[bool] = True
    #: False: no identity labels (every image its own identity); only linkage protocols can run (the plan
    #: restricts ``evaluate`` to full-ref/linkage and the report says so)
    labeled: bool = True

    @abc.abstractmethod
    def items(self, ctx: DatasetContext) -> list[RawItem]:
        """Every image of the dataset (unchecked: the prepare stage validates them)."""

    def preview(self, ctx: DatasetContext) -> list[RawItem]:
        """The items without making or decoding any image (``anonrisk validate`` counts identities and
        splits from them); a kind that makes its images in ``items`` overrides it."""
        return self.items(ctx)


DATASETS: Registry[type[Dataset]] = Registry("dataset", group="anonrisk.datasets")


@DATASETS.register("celeba")
class CelebA(Dataset):
    """CelebA as distributed: img_align_celeba/, identity_CelebA.txt, list_eval_partition.txt."""

    def items(self, ctx: DatasetContext) -> list[RawItem]:
        root = ctx.root
        images = root / "img_align_celeba"
        ident_file = root / "identity_CelebA.txt"
        part_file = root / "list_eval_partition.txt"
        if not images.is_dir():
            raise DataError(f"CelebA: image folder not found: {images}")
        if not ident_file.exists():
            raise DataError(f"CelebA: identity file not found: {ident_file}")
        partition = {}
        if part_file.exists():
            for lineno, line in enumerate(_read_text(part_file).splitlines(), 1):
                if line.strip():
                    try:
                        name, p = line.split()
                        partition[name] = {"0": "train", "1": "aux", "2": "test"}[p]
                    except (ValueError, KeyError):
                        raise DataError(f"{part_file}:{lineno}: expected '<image> <0|1|2>', got {line!r}") from None
        items = []
        for lineno, line in enumerate(_read_text(ident_file).splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise DataError(f"{ident_file}:{lineno}: expected '<image> <identity>', got {line!r}")
            name, ident = parts
            path = join_under(images, name, f"{ident_file}:{lineno}")
            items.append(RawItem(id=record_id(path, root), identity=ident, path=str(path), official_split=partition.get(name)))
        return items


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def folder_items(root: Path, ids_from: Optional[Path] = None) -> list[RawItem]:
    """Any folder-per-identity tree: ``root/<identity>/<image>``; ids relative to ``ids_from`` (the dataset
    root; default ``root``)."""
    items = []
    for person in sorted(p for p in root.iterdir() if p.is_dir()):
        for img in sorted(person.iterdir()):
            if img.suffix.lower() in IMAGE_EXTS:
                items.append(RawItem(id=record_id(img, ids_from or root), identity=person.name, path=str(img)))
    return items


@DATASETS.register("folder")
class Folder(Dataset):
    """Any folder-per-identity tree: ``root/<identity>/<image>``."""

    def items(self, ctx: DatasetContext) -> list[RawItem]:
        return folder_items(ctx.root)


@DATASETS.register("lfw")
class LFW(Dataset):
    """LFW as distributed (``lfw/<Person_Name>/<Person_Name>_0001.jpg``); accepts the root or its parent."""

    def items(self, ctx: DatasetContext) -> list[RawItem]:
        root = ctx.root / "lfw" if (ctx.root / "lfw").is_dir() else ctx.root
        return folder_items(root, ctx.root)


class SyntheticParams(Strict):
    identities: int = Field(150, ge=2, le=1_000_000)
    images_per_identity: int = Field(10, ge=2, le=10_000)
    seed: int = 0


@DATASETS.register("synthetic")
class Synthetic(Dataset):
    """The embedded default: procedurally drawn faces (``synthetic.py``), rendered into the prepare stage
    (resuming: images already there are kept)."""

    Params = SyntheticParams
    needs_root = False

    def preview(self, ctx: DatasetContext) -> list[RawItem]:
        s = self.p
        return [RawItem(id=f"id{i:05d}/{j:03d}.png", identity=f"id{i:05d}", path=str(ctx.out_dir / f"id{i:05d}" / f"{j:03d}.png"))
                for i in range(s.identities) for j in range(s.images_per_identity)]

    def items(self, ctx: DatasetContext) -> list[RawItem]:
        from tqdm import tqdm

        from anonrisk.data.io import save_image
        from anonrisk.data.synthetic import render_image

        s = self.p
        items = self.preview(ctx)
        for k, it in enumerate(tqdm(items, desc="render synthetic", disable=None if ctx.progress else True, leave=False)):
            i, j = divmod(k, s.images_per_identity)
            if not Path(it.path).exists():
                save_image(it.path, render_image(s.seed, i, j, ctx.image_size))
        return items
