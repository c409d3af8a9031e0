"""``wild``: in-the-wild photos, each detected and aligned to a fixed crop in the prepare stage (``align.py``).

``root/<identity>/<photo>`` with ``labeled: true`` (the default), any tree of photos with ``labeled: false``
(every photo its own identity: linkage only). A record's id is its photo's path relative to ``data.root``;
its image is the aligned crop (``crop`` px, default the working size) written into the prepare stage.
Photos where no face is found are left out, listed in the prepare stage's DONE (``no_face``) and in a
warning; no face at all is an error.
"""

from __future__ import annotations

import logging
from typing import Optional

from pydantic import Field

from anonrisk.config.validation import Strict
from anonrisk.data.datasets import DATASETS, Dataset, DatasetContext, RawItem
from anonrisk.data.unlabeled import image_tree
from anonrisk.errors import DataError

log = logging.getLogger("anonrisk")


class WildParams(Strict):
    labeled: bool = True  # root/<identity>/<photo>; false: every photo its own identity
    crop: Optional[int] = Field(None, ge=16, le=2048)  # the aligned crop's side (default: data.image_size)
    padding: float = Field(0.25, ge=0, le=2)
    upsample: int = Field(1, ge=0, le=3)  # detector upsampling: finds smaller faces, slower
    models_dir: Optional[str] = None  # holds shape_predictor_5_face_landmarks.dat (default: face-recognition-models)


@DATASETS.register("wild")
class Wild(Dataset):
    Params = WildParams

    def __init__(self, params: WildParams, key: str = ""):
        super().__init__(params, key)
        self.no_face: list[str] = []

    @property
    def labeled(self) -> bool:  # type: ignore[override]
        return self.p.labeled

    def prepare_summary(self) -> dict:
        return {"no_face": self.no_face} if self.no_face else {}

    def items(self, ctx: DatasetContext) -> list[RawItem]:
        from anonrisk.data.align import align_face
        from anonrisk.data.io import is_readable, load_image, save_image

        size = self.p.crop or ctx.image_size
        items, self.no_face = [], []
        for rel, path in image_tree(ctx.root):
            if self.p.labeled and "/" not in rel:
                raise DataError(f"wild: {path}: expected root/<identity>/<photo> (or data.wild.labeled: false)")
            out = ctx.out_dir / f"{rel}.png"
            if not out.exists():
                bad = is_readable(path)
                if bad:  # the prepare stage's check (fail or quarantine) names it
                    items.append(RawItem(id=rel, identity=rel.split("/")[0] if self.p.labeled else rel, path=str(path)))
                    continue
                face = align_face(load_image(path), size, self.p.padding, self.p.upsample, self.p.models_dir)
                if face is None:
                    self.no_face.append(rel)
                    continue
                save_image(out, face)
            items.append(RawItem(id=rel, identity=rel.split("/")[0] if self.p.labeled else rel, path=str(out)))
        if self.no_face:
            log.warning("wild: no face found in %d of %d photos, left out: %s", len(self.no_face), len(items) + len(self.no_face),
                        ", ".join(self.no_face[:10]) + (" ..." if len(self.no_face) > 10 else ""))
        if not items:
            raise DataError(f"wild: no face found in any photo under {ctx.root}")
        return items
