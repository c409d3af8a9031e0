"""``precomputed``: anonymized images made elsewhere (another lab's model, a paper's released outputs).

The output of an original sits at the same path relative to ``params.root`` as the original relative to its
dataset root (its record id), with any common image extension: the output of ``person/img.jpg`` is
``<root>/person/img.png`` (or ``.jpg``, ``.webp``, ...). When the stage starts, every record's output is
checked (found, one only, fully decodable, and with ``size_mismatch: fail`` of the original's size): the
stage then fails listing the records without one, or leaves them out with ``data.on_bad_image: quarantine``
(``quarantine.json`` in the stage). An output of another size than its original is resized to it with a
warning (``size_mismatch: resize``, the default); then it is read like the original (centre square, working
size), so output and original stay pixel-aligned.

The stage's fingerprint is a digest of the content of every image file under ``root`` (not of its path):
changed, added or removed files make a new stage, never a silently reused one; the same files moved to
another folder reuse it. See ``external.folder_digest`` for its cache.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from anonrisk.anonymize.base import ANONYMIZERS, Anonymizer, ShardInfo
from anonrisk.anonymize.external import find_output, fit_output, folder_digest, output_index
from anonrisk.config.validation import Strict
from anonrisk.data.io import fit_square, is_readable
from anonrisk.errors import ConfigError, DataError

log = logging.getLogger("anonrisk")


class PrecomputedParams(Strict):
    root: str  # the folder of outputs
    size_mismatch: Literal["resize", "fail"] = "resize"  # an output whose size is not its original's


@ANONYMIZERS.register("precomputed")
class Precomputed(Anonymizer):
    Params = PrecomputedParams
    per_shard = True

    def __init__(self, params: PrecomputedParams, key: str = ""):
        super().__init__(params, key)
        self._digest: Optional[tuple[str, int]] = None
        self._outputs: Optional[dict[str, list[Path]]] = None

    @property
    def root(self) -> Path:
        return Path(self.p.root).expanduser()

    def validate(self) -> None:
        if not self.root.is_dir():
            raise ConfigError(f"{self.key}: params.root: folder not found: {self.root}")
        if self.content()[1] == 0:
            raise ConfigError(f"{self.key}: params.root: no image files in {self.root}")

    def content(self) -> tuple[str, int]:
        """(digest of the outputs' content, number of image files), once per process."""
        if self._digest is None:
            self._digest = folder_digest(self.root) if self.root.is_dir() else ("missing", 0)
        return self._digest

    def describe(self) -> dict:
        digest, n = self.content()
        return {"class": type(self).__name__, "version": self.version, "params": {"size_mismatch": self.p.size_mismatch},
                "content": digest, "files": n}

    def outputs(self) -> dict[str, list[Path]]:
        if self._outputs is None:
            self._outputs = output_index(self.root)
        return self._outputs

    def _problem(self, record) -> Optional[str]:
        path, why = find_output(self.outputs(), record.id)
        if path is None:
            return f"{why} for it under {self.root}"
        bad = is_readable(path)
        if bad:
            return f"unreadable output {path}: {bad}"
        if self.p.size_mismatch == "fail":
            with Image.open(path) as out, Image.open(record.path) as orig:
                if out.size != orig.size:
                    return (f"output {path} is {out.size[0]}x{out.size[1]}, the original {orig.size[0]}x{orig.size[1]} "
                            "(params.size_mismatch: resize accepts it)")
        return None

    def unusable(self, records: Sequence) -> Mapping[str, str]:
        with ThreadPoolExecutor(8) as pool:  # decoding releases the GIL
            problems = list(pool.map(self._problem, records))
        return {r.id: why for r, why in zip(records, problems) if why}

    def _read(self, record, size: int) -> tuple[np.ndarray, bool]:
        path, why = find_output(self.outputs(), record.id)
        if path is None:
            raise DataError(f"{self.key}: record {record.id}: {why} under {self.root}")
        with Image.open(record.path) as orig:
            want = orig.size
        try:
            with Image.open(path) as im:
                im, resized = fit_output(im.convert("RGB"), want, self.p.size_mismatch, f"{self.key}: output {path}")
                return np.asarray(fit_square(im, size), dtype=np.uint8).copy(), resized
        except OSError as exc:
            raise DataError(f"{self.key}: unreadable output {path}: {exc}") from None

    def __call__(self, images: np.ndarray, seeds: Sequence[int], shard: Optional[ShardInfo] = None) -> np.ndarray:
        if shard is None or len(shard.records) != len(images):
            raise ValueError("precomputed outputs are found by record: call it with shard=ShardInfo(records)")
        read = [self._read(r, images.shape[1]) for r in shard.records]
        resized = sum(r for _, r in read)
        if resized:
            log.warning("%s: %d outputs of %s differ in size from their originals: resized to them "
                        "(params.size_mismatch: fail refuses them)", self.key, resized, shard.label())
        return np.stack([x for x, _ in read]) if read else images.copy()

    def runtime(self) -> dict:
        return {"device": "cpu", "backend": "files"}
