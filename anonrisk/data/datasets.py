"""Dataset kinds: each turns a dataset's real on-disk layout into raw items (record id, identity, path,
official split). ``prepare.py`` (the prepare stage) validates, filters and splits them.

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


def folder_items(root: Path) -> list[RawItem]:
    """Any folder-per-identity tree: ``root/<identity>/<image>``."""
    items = []
    for person in sorted(p for p in root.iterdir() if p.is_dir()):
        for img in sorted(person.iterdir()):
            if img.suffix.lower() in IMAGE_EXTS:
                items.append(RawItem(id=f"{person.name}/{img.stem}", identity=person.name, path=str(img)))
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
        return folder_items(root)


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

    def items(self, ctx: DatasetContext) -> list[RawItem]:
        from tqdm import tqdm

        from anonrisk.data.io import save_image
        from anonrisk.data.synthetic import render_image

        s = self.p
        items = []
        todo = [(i, j) for i in range(s.identities) for j in range(s.images_per_identity)]
        for i, j in tqdm(todo, desc="render synthetic", disable=None if ctx.progress else True, leave=False):
            path = ctx.out_dir / f"id{i:05d}" / f"{j:03d}.png"
            if not path.exists():
                save_image(path, render_image(s.seed, i, j, ctx.image_size))
            items.append(RawItem(id=f"id{i:05d}_{j:03d}", identity=f"id{i:05d}", path=str(path)))
        return items
