"""Verbatim-copy audit: how much of each anonymized image, and of its face region, is the original's pixels.

This is the leak path of recipes that paste the original back where a redraw fails a check, or that blend
an unchanged background or face: a copied pixel carries the original's identity whatever the rest does.

A pixel counts as copied when every channel of the anonymized pixel is within ``tolerance`` of the
original's (0: exact equality, the default; a small tolerance also catches copies that went through lossy
re-encoding). The face region is a box or a boolean mask; the default is ``FACE_BOX``, the central face box
of an aligned face crop (fractions of the height and width). An identity "anonymizer" reads 1.0 everywhere,
independent noise reads about (2 * tolerance + 1)^3 / 256^3 (about 0 for tolerance 0).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import numpy as np

#: (top, left, bottom, right) as fractions of (height, width): the face of an aligned crop (CelebA-style
#: aligned faces and the synthetic faces put eyes, nose and mouth inside it)
FACE_BOX = (0.2, 0.2, 0.85, 0.8)

Box = Sequence[Union[int, float]]


def region_mask(shape: tuple[int, int], box: Optional[Box] = None, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """(H, W) bool mask of the face region: ``mask`` as given, else ``box`` (top, left, bottom, right) in pixels
    (ints) or fractions (floats in [0, 1]), else ``FACE_BOX``."""
    h, w = shape
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != (h, w):
            raise ValueError(f"face mask has shape {mask.shape}, the images are {(h, w)}")
        return mask
    top, left, bottom, right = FACE_BOX if box is None else box
    if all(isinstance(v, float) for v in (top, left, bottom, right)):
        top, bottom, left, right = round(top * h), round(bottom * h), round(left * w), round(right * w)
    if not (0 <= top < bottom <= h and 0 <= left < right <= w):
        raise ValueError(f"face box {tuple(box or FACE_BOX)} is empty or outside a {h}x{w} image")
    out = np.zeros((h, w), bool)
    out[int(top) : int(bottom), int(left) : int(right)] = True
    return out


def copied_pixels(original: np.ndarray, anonymized: np.ndarray, tolerance: int = 0) -> np.ndarray:
    """(H, W) bool: pixels whose every channel is within ``tolerance`` of the original."""
    if original.shape != anonymized.shape:
        raise ValueError(f"image shapes differ: original {original.shape}, anonymized {anonymized.shape}")
    diff = np.abs(original.astype(np.int32) - anonymized.astype(np.int32))
    return (diff <= tolerance).all(-1) if diff.ndim == 3 else diff <= tolerance


def copy_fractions(original: np.ndarray, anonymized: np.ndarray, tolerance: int = 0, box: Optional[Box] = None,
                   mask: Optional[np.ndarray] = None) -> tuple[float, float]:
    """(share of the image copied, share of the face region copied) for one pair."""
    same = copied_pixels(original, anonymized, tolerance)
    face = region_mask(same.shape, box, mask)
    return float(same.mean()), float(same[face].mean())


def verbatim_copy_audit(pairs: Iterable[tuple[np.ndarray, np.ndarray]], tolerance: int = 0, box: Optional[Box] = None,
                        mask: Optional[np.ndarray] = None, pasted_threshold: float = 0.99) -> dict:
    """Per pair and summarised: ``image`` and ``face`` copied shares (mean, median, max), and the share of
    images whose face region is at least ``pasted_threshold`` copied (``pasted_faces``)."""
    rows = np.array([copy_fractions(o, a, tolerance, box, mask) for o, a in pairs], dtype=np.float64).reshape(-1, 2)
    if not len(rows):
        raise ValueError("verbatim-copy audit: no image pairs")
    out: dict = {"n_pairs": len(rows), "tolerance": tolerance, "per_image": rows[:, 0].tolist(), "per_face": rows[:, 1].tolist()}
    for name, col in (("image", rows[:, 0]), ("face", rows[:, 1])):
        out[name] = {"mean": float(col.mean()), "median": float(np.median(col)), "max": float(col.max())}
    out["pasted_faces"] = float((rows[:, 1] >= pasted_threshold).mean())
    return out
