"""``hf``: a Hugging Face dataset on local disk (never downloaded), in one of three forms, found under
``data.root``:

- ``disk``: a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``datasets.load_from_disk``);
- ``parquet``: one or more ``*.parquet`` files (the Hub's storage format);
- ``imagefolder``: ``<root>/<label>/<image>`` read by the ``imagefolder`` builder (its ``label`` is the identity).

``auto`` (the default) picks by what is there. The identity is ``params.identity_column`` (a ClassLabel's
name or the value as text); ``identity_column: null`` means no identity labels (linkage only, like
``unlabeled``). Images are written into the prepare stage as ``<split>/<row index>.<format>`` (their bytes as
stored, or PNG for decoded arrays), which is also the record id: rows have no path of their own.
The splits of a DatasetDict are all read unless ``params.splits`` names some; with ``data.split.use_official``
its train / validation / test become train / aux / test. Needs ``pip install 'anonrisk[hf]'``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal, Optional

from anonrisk.config.validation import Strict
from anonrisk.data.datasets import DATASETS, Dataset, DatasetContext, RawItem
from anonrisk.errors import ConfigError, DataError, Unavailable

OFFICIAL = {"train": "train", "validation": "aux", "valid": "aux", "test": "test"}


class HFParams(Strict):
    format: Literal["auto", "disk", "parquet", "imagefolder"] = "auto"
    image_column: str = "image"
    identity_column: Optional[str] = "identity"  # null: no identity labels (linkage only)
    splits: Optional[list[str]] = None  # of a DatasetDict (default: all)


def detect_format(root: Path) -> str:
    if (root / "dataset_dict.json").exists() or (root / "dataset_info.json").exists() or (root / "state.json").exists():
        return "disk"
    if any(root.rglob("*.parquet")):
        return "parquet"
    return "imagefolder"


def load_local(root: Path, fmt: str):
    """A ``datasets.DatasetDict`` (or Dataset) of the folder, offline."""
    try:
        import datasets
    except ImportError:
        raise Unavailable("data.dataset hf needs the datasets package: pip install 'anonrisk[hf]'") from None
    if fmt == "disk":
        return datasets.load_from_disk(str(root))
    if fmt == "parquet":
        files = sorted(str(p) for p in root.rglob("*.parquet"))
        return datasets.load_dataset("parquet", data_files=files)
    return datasets.load_dataset("imagefolder", data_dir=str(root))


@DATASETS.register("hf")
class HFDataset(Dataset):
    Params = HFParams

    @property
    def labeled(self) -> bool:  # type: ignore[override]
        return self.p.identity_column is not None

    def items(self, ctx: DatasetContext) -> list[RawItem]:
        import datasets

        fmt = detect_format(ctx.root) if self.p.format == "auto" else self.p.format
        loaded = load_local(ctx.root, fmt)
        parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"all": loaded}
        if self.p.splits:
            unknown = [s for s in self.p.splits if s not in parts]
            if unknown:
                raise ConfigError(f"data.hf.splits: {', '.join(unknown)} not in {ctx.root} (splits: {', '.join(parts)})")
            parts = {s: parts[s] for s in self.p.splits}
        identity = self.p.identity_column or None
        if fmt == "imagefolder" and identity == "identity":
            identity = "label"  # the builder's name for the folder
        items = []
        for split, ds in parts.items():
            for col in (self.p.image_column, identity):
                if col and col not in ds.column_names:
                    key = "image_column" if col == self.p.image_column else "identity_column"
                    raise ConfigError(f"data.hf.{key}: no column {col!r} in {ctx.root} ({split}); columns: {', '.join(ds.column_names)}")
            feature = ds.features.get(identity) if identity else None
            names = feature.names if isinstance(feature, datasets.ClassLabel) else None
            raw = ds.cast_column(self.p.image_column, datasets.Image(decode=False))
            for i, row in enumerate(raw):
                path = self._write(ctx.out_dir, split, i, row[self.p.image_column])
                rid = path.relative_to(ctx.out_dir).as_posix()
                ident = rid if identity is None else (names[row[identity]] if names else str(row[identity]))
                items.append(RawItem(id=rid, identity=ident, path=str(path), official_split=OFFICIAL.get(split)))
        return items

    @staticmethod
    def _write(out_dir: Path, split: str, i: int, image: dict) -> Path:
        """The row's image as a file in the prepare stage (its stored bytes, in their own format)."""
        from PIL import Image

        data = image.get("bytes")
        if data is None and image.get("path"):
            data = Path(image["path"]).read_bytes()
        if data is None:
            raise DataError(f"hf: {split} row {i}: no image bytes or path")
        try:
            with Image.open(io.BytesIO(data)) as im:
                ext = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp"}.get(im.format or "", ".png")
        except OSError:
            ext = ".png"  # unreadable: written as it is; the prepare stage's check names it
        path = out_dir / split / f"{i:06d}{ext}"
        if not (path.exists() and path.stat().st_size == len(data)):  # resuming: kept
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return path
