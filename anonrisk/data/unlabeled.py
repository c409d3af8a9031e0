"""``unlabeled``: a folder of face images without identity labels (FFHQ, CelebA-HQ as released: any tree of
images). Every image is its own identity, so only linkage can be measured (is an anonymized face linked to
its own original among all the others?): the plan runs full-ref/linkage only and the report says so.
Record ids are the images' POSIX paths relative to ``data.root``, extension included."""

from __future__ import annotations

from pathlib import Path

from anonrisk.data import io
from anonrisk.data.datasets import DATASETS, IMAGE_EXTS, Dataset, DatasetContext, RawItem
from anonrisk.errors import DataError


def image_tree(root: Path) -> list[tuple[str, Path]]:
    """Every image under ``root`` as (POSIX path relative to root, path), sorted; hidden entries skipped."""
    return io.image_tree(root, IMAGE_EXTS)


@DATASETS.register("unlabeled")
class Unlabeled(Dataset):
    labeled = False

    def items(self, ctx: DatasetContext) -> list[RawItem]:
        found = image_tree(ctx.root)
        if not found:
            raise DataError(f"unlabeled: no images ({', '.join(sorted(IMAGE_EXTS))}) under {ctx.root}")
        return [RawItem(id=rel, identity=rel, path=str(path)) for rel, path in found]
