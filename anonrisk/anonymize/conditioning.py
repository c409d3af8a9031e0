"""Condition maps for ControlNets, cached by content hash: condition -> annotator (``annotators.py``) -> map.

Maps are cached by a hash of the image bytes and everything that decides the map (annotator, options,
weights, size): in memory (bounded in bytes, shared by the process) and optionally on disk as PNG files.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np

from anonrisk.anonymize.annotators import get_annotator, hwc3, resize_map, weights_identity
from anonrisk.anonymize.conditions import Condition


class _MapStore:
    """The in-memory map cache of a process, shared by every anonymizer (keys hash the image and everything
    that decides its map), least recently used out first, bounded in bytes."""

    def __init__(self):
        self.maps: OrderedDict[str, np.ndarray] = OrderedDict()
        self.nbytes = 0
        self.max_bytes = 0
        self.lock = threading.Lock()

    def get(self, k: str) -> Optional[np.ndarray]:
        with self.lock:
            a = self.maps.get(k)
            if a is not None:
                self.maps.move_to_end(k)
            return a

    def put(self, k: str, a: np.ndarray, max_bytes: int) -> None:
        with self.lock:
            self.max_bytes = max(self.max_bytes, max_bytes)
            if k in self.maps or a.nbytes > self.max_bytes:
                return
            self.maps[k] = a
            self.nbytes += a.nbytes
            while self.nbytes > self.max_bytes:
                _, old = self.maps.popitem(last=False)
                self.nbytes -= old.nbytes

    def clear(self) -> None:
        with self.lock:
            self.maps.clear()
            self.nbytes = 0


STORE = _MapStore()


class ConditionMaps:
    """Computes condition maps through annotators, with a content-hash cache: in memory (``STORE``, shared
    by the process; ``max_bytes=0`` turns it off) and optionally on disk (``cache_dir``, PNG files)."""

    def __init__(self, weights: dict[str, str], seed: int = 0, cache_dir: Optional[str] = None,
                 max_bytes: int = 256 << 20, device: str = "cpu"):
        self.weights = dict(weights)
        self.seed = seed
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.max_bytes = max_bytes
        self.device = device
        self.hits = 0
        self.misses = 0

    def key(self, cond: Condition, image: np.ndarray) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(image).tobytes())
        h.update(repr((image.shape, cond.name, cond.annotator, cond.options, self.seed,
                       weights_identity(self.weights.get(cond.annotator)))).encode())
        return h.hexdigest()[:32]

    def __call__(self, cond: Condition, image: np.ndarray) -> np.ndarray:
        k = self.key(cond, image)
        out = STORE.get(k) if self.max_bytes else None
        if out is None:
            out = self._disk_get(k)
            if out is None:
                self.misses += 1
                fn = get_annotator(cond.annotator, self.weights.get(cond.annotator), self.seed, cond.opts, self.device)
                out = hwc3(np.asarray(fn(image), dtype=np.uint8))
                if out.shape != image.shape:
                    out = resize_map(out, *image.shape[:2])
                self._disk_put(k, out)
            else:
                self.hits += 1
            out.setflags(write=False)  # shared through the cache
            if self.max_bytes:
                STORE.put(k, out, self.max_bytes)
        else:
            self.hits += 1
        return out

    def _disk_get(self, k: str) -> Optional[np.ndarray]:
        if self.cache_dir is None:
            return None
        p = self.cache_dir / k[:2] / f"{k}.png"
        if not p.exists():
            return None
        from PIL import Image

        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()

    def _disk_put(self, k: str, a: np.ndarray) -> None:
        if self.cache_dir is None:
            return
        from PIL import Image

        from anonrisk.stages import atomic_path

        with atomic_path(self.cache_dir / k[:2] / f"{k}.png") as tmp:
            Image.fromarray(a).save(tmp, format="PNG")
