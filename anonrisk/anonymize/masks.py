"""The region an ``inpaint`` diffusion anonymizer redraws: a fixed ellipse or box (aligned crops), a mask
file, the whole image, or ellipses around the faces a detector finds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from anonrisk.anonymize.diffusion_params import MaskSpec
from anonrisk.errors import ConfigError


def validate_mask(mk: MaskSpec) -> None:
    if mk.kind == "file":
        if not mk.path or not Path(mk.path).is_file():
            raise ConfigError(f"params.mask.path: mask file {mk.path!r} does not exist (kind: file needs a grayscale image)")
    if mk.kind == "detector":
        if not mk.detector_weights or not Path(mk.detector_weights).is_file():
            raise ConfigError(
                f"params.mask.detector_weights: the {mk.detector} detector needs a local cascade file "
                f"(haarcascade_frontalface_default.xml), got {mk.detector_weights!r}; or use mask.kind ellipse/box for aligned crops"
            )


def load_cascade(mk: MaskSpec):
    import cv2

    cascade = cv2.CascadeClassifier(mk.detector_weights)
    if cascade.empty():
        raise ConfigError(f"params.mask.detector_weights: {mk.detector_weights!r} is not a readable cascade file")
    return cascade


def make_masks(mk: MaskSpec, work_u8: np.ndarray, detector: Callable[[], Any]) -> np.ndarray:
    """Soft masks (N,h,w) in [0,1] at the working resolution; 1 = redraw. ``detector()`` gives the face
    detector (an OpenCV cascade) for ``kind: detector``."""
    from scipy import ndimage

    n, h, w, _ = work_u8.shape
    yy, xx = np.mgrid[0:h, 0:w]
    u, v = (xx + 0.5) / w, (yy + 0.5) / h

    def ellipse(cx, cy, rx, ry):
        return (((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 <= 1.0).astype(np.float32)

    if mk.kind == "full":
        hard = np.ones((n, h, w), np.float32)
    elif mk.kind == "ellipse":
        hard = np.repeat(ellipse(*mk.center, *mk.radii)[None], n, 0)
    elif mk.kind == "box":
        x0, y0, x1, y1 = mk.box
        hard = np.repeat(((u >= x0) & (u < x1) & (v >= y0) & (v < y1)).astype(np.float32)[None], n, 0)
    elif mk.kind == "file":
        from PIL import Image

        with Image.open(mk.path) as im:
            one = np.asarray(im.convert("L").resize((w, h), Image.BILINEAR), np.float32) / 255.0
        hard = np.repeat((one >= 0.5).astype(np.float32)[None], n, 0)
    else:  # detector
        import cv2

        cascade = detector()
        hard = np.zeros((n, h, w), np.float32)
        for i, img in enumerate(work_u8):
            faces = cascade.detectMultiScale(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), 1.1, 3)
            for (x, y, fw, fh) in faces:
                g = 1.0 + mk.margin
                hard[i] = np.maximum(hard[i], ellipse((x + fw / 2) / w, (y + fh / 2) / h, fw * g / 2 / w, fh * g / 2 / h))
            if not hard[i].any():
                hard[i] = 1.0 if mk.fallback == "full" else ellipse(*mk.center, *mk.radii)
    if mk.feather > 0 and mk.kind != "full":
        sig = mk.feather * max(h, w)
        return np.clip(ndimage.gaussian_filter(hard, sigma=(0, sig, sig), mode="nearest"), 0, 1).astype(np.float32)
    return hard
