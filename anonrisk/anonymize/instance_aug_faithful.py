"""``instance-aug-faithful``: the instance-augmentation recipe (arXiv 2406.08249) with the two rules of its
public code that the idealized ``instance-aug`` preset leaves out, both leak paths:

- minimum area: a person (a connected region of the redraw mask) smaller than ``min_person_area`` pixels
  of the original image (600 in the recipe) is never redrawn: its pixels stay the original's;
- paste-back check: after the redraw a detector runs on the original and on the result; a person is pasted
  back only if a detection on the result overlaps its detection on the original with IoU above
  ``redetect_iou`` (0.7 in the recipe); otherwise the original pixels of that person are kept.

The detector is pluggable: ``dlib_hog`` (dlib's HOG frontal-face detector, built into dlib: no weight
file, offline), ``haar`` (an OpenCV cascade XML from ``redetector_weights``), or ``none`` (no check: the
minimum-area rule alone). A person the detector does not find on the original is matched by its mask's
bounding box. The verbatim-copy audit (``anonrisk.evaluate.audit``) measures what the two rules copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal, Optional

import numpy as np
from pydantic import Field

from anonrisk.anonymize.base import ANONYMIZERS
from anonrisk.anonymize.diffusion import DiffusionAnonymizer
from anonrisk.anonymize.diffusion_params import DiffusionParams
from anonrisk.errors import ConfigError

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


class FaithfulParams(DiffusionParams):
    mode: Literal["inpaint"] = "inpaint"
    min_person_area: int = Field(600, ge=0)  # pixels of the original image; smaller persons are not redrawn
    redetect_iou: float = Field(0.7, ge=0.0, le=1.0)  # a redraw is kept only above this IoU
    redetector: Literal["dlib_hog", "haar", "none"] = "dlib_hog"
    redetector_weights: Optional[str] = None  # haar: the cascade XML
    redetect_upsample: int = Field(1, ge=0, le=3)  # dlib_hog: image doublings before detection (small faces)


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def persons(hard: np.ndarray) -> list[np.ndarray]:
    """The connected regions (8-connectivity) of one (h, w) hard mask, each a bool mask."""
    from scipy import ndimage

    labels, n = ndimage.label(hard > 0, structure=np.ones((3, 3)))
    return [labels == k for k in range(1, n + 1)]


def box_of(region: np.ndarray) -> Box:
    ys, xs = np.nonzero(region)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def upscale(region: np.ndarray, H: int, W: int) -> np.ndarray:
    """A work-resolution bool mask at the original size (nearest neighbour)."""
    h, w = region.shape
    yi = np.minimum((np.arange(H) * h) // H, h - 1)
    xi = np.minimum((np.arange(W) * w) // W, w - 1)
    return region[yi][:, xi]


@ANONYMIZERS.register("instance-aug-faithful")
class InstanceAugFaithful(DiffusionAnonymizer):
    """instance-aug plus the recipe's minimum-area rule and re-detection paste-back check."""

    version: ClassVar[int] = 1
    Params = FaithfulParams
    kind: ClassVar[str] = "instance-aug-faithful"

    def __init__(self, params, key: str = ""):
        super().__init__(params, key)
        self._orig_hw: tuple[int, int] = (0, 0)
        self._det = None
        self.kept_original: list[str] = []  # why persons kept their original pixels (last call): "small" / "redetect"

    def _validate_extra(self) -> None:
        p = self.p
        if not p.paste_back:
            raise ConfigError("params.paste_back: instance-aug-faithful pastes back (the recipe's check decides what)")
        if p.redetector == "haar" and not (p.redetector_weights and Path(p.redetector_weights).is_file()):
            raise ConfigError(f"params.redetector_weights: the haar re-detector needs a local cascade XML, got {p.redetector_weights!r}")

    # ---- the recipe's two rules ------------------------------------------------------------------------

    def make_masks(self, work_u8: np.ndarray) -> np.ndarray:
        """The usual masks without the persons under ``min_person_area`` pixels of the original image."""
        soft = super().make_masks(work_u8)
        H, W = self._orig_hw
        n, h, w = soft.shape
        scale = (H * W) / float(h * w) if H else 1.0
        out = soft.copy()
        for i in range(n):
            for region in persons(soft[i] >= 0.5):
                if region.sum() * scale < self.p.min_person_area:
                    out[i][self._reach(region)] = 0.0
        return out

    def _reach(self, region: np.ndarray) -> np.ndarray:
        """The pixels a person's soft mask touches: its hard region grown by the feather."""
        from scipy import ndimage

        grow = int(np.ceil(3 * self.p.mask.feather * max(region.shape))) if self.p.mask.feather > 0 else 0
        return ndimage.binary_dilation(region, iterations=grow) if grow else region

    def detect(self, image: np.ndarray) -> list[Box]:
        """Face boxes (x0, y0, x1, y1) of one uint8 RGB image with the configured re-detector."""
        p = self.p
        if self._det is None:
            if p.redetector == "dlib_hog":
                import dlib

                self._det = dlib.get_frontal_face_detector()
            elif p.redetector == "haar":
                import cv2

                self._det = cv2.CascadeClassifier(p.redetector_weights)
        if p.redetector == "dlib_hog":
            return [(r.left(), r.top(), r.right(), r.bottom()) for r in self._det(np.ascontiguousarray(image), p.redetect_upsample)]
        import cv2

        found = self._det.detectMultiScale(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 1.1, 3)
        return [(float(x), float(y), float(x + w), float(y + h)) for (x, y, w, h) in found]

    def _generate(self, images, seeds, noise_seeds):
        n, H, W, _ = images.shape
        self._orig_hw = (H, W)
        out, reasons = super()._generate(images, seeds, noise_seeds)
        self.kept_original = []
        h, w = self.work_size(H, W)
        work = np.stack([np.asarray(_resize_u8(im, h, w)) for im in images])
        masks = super().make_masks(work)  # every person, small ones included
        for i in range(n):
            before = self.detect(images[i]) if self.p.redetector != "none" else []
            after = self.detect(out[i]) if self.p.redetector != "none" else []
            for region in persons(masks[i] >= 0.5):
                if region.sum() * (H * W) / float(h * w) < self.p.min_person_area:
                    self.kept_original.append("small")  # never redrawn: make_masks dropped it
                    continue
                if self.p.redetector == "none":
                    continue
                own = box_of(upscale(region, H, W))
                ref = max(before, key=lambda b: iou(b, own), default=None)
                ref = ref if ref is not None and iou(ref, own) > 0 else own
                if max((iou(ref, b) for b in after), default=0.0) <= self.p.redetect_iou:
                    keep = upscale(self._reach(region), H, W)
                    out[i][keep] = images[i][keep]
                    self.kept_original.append("redetect")
        return out, reasons


def _resize_u8(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """The sampler's working image (bilinear, as ``sampler.resize`` does it) for the mask procedure."""
    import torch

    from anonrisk.anonymize.sampler import resize

    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    return (resize(x, h, w).clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
