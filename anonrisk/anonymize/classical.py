"""Classical baselines and a CPU structure-preserving resynthesis.

``resynth`` keeps an image's edge map and redraws everything else (region colours, texture, lighting)
from the record's seed: the mechanism of a structure-conditioned diffusion anonymizer, cheap enough for
the quickstart. It reproduces the finding that conditioning on edges leaks identity.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from pydantic import Field
from scipy import ndimage

from anonrisk.anonymize.base import ANONYMIZERS, Anonymizer, check_batch
from anonrisk.config.validation import Strict
from anonrisk.evaluate.leakage import edge_map, to_gray


@ANONYMIZERS.register("identity")
class IdentityAnonymizer(Anonymizer):
    """Returns its input: the upper bound of re-identification (a sanity check for every attack)."""

    def __call__(self, images: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        check_batch(images, seeds)
        return images.copy()


@ANONYMIZERS.register("noise")
class NoiseAnonymizer(Anonymizer):
    """Replaces every image with uniform noise: the chance-level lower bound."""

    def __call__(self, images: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        check_batch(images, seeds)
        shape = images.shape[1:]
        return np.stack([np.random.default_rng(s).integers(0, 256, shape, dtype=np.uint8) for s in seeds])


@ANONYMIZERS.register("blur")
class BlurAnonymizer(Anonymizer):
    """Gaussian blur; ``sigma`` is a fraction of the image side so presets mean the same at any size."""

    class Params(Strict):
        sigma: float = Field(0.06, gt=0)

    def __call__(self, images: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        check_batch(images, seeds)
        s = self.p.sigma * images.shape[1]
        out = ndimage.gaussian_filter(images.astype(np.float32), sigma=(0, s, s, 0), mode="nearest")
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)


@ANONYMIZERS.register("pixelate")
class PixelateAnonymizer(Anonymizer):
    """Averages ``blocks`` x ``blocks`` cells over the image and repeats them back to full size."""

    class Params(Strict):
        blocks: int = Field(6, ge=1)

    def __call__(self, images: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        check_batch(images, seeds)
        n, h, w, c = images.shape
        b = self.p.blocks
        ys = np.minimum(np.arange(h) * b // h, b - 1)
        xs = np.minimum(np.arange(w) * b // w, b - 1)
        cell = ys[:, None] * b + xs[None, :]  # (h, w) cell index of every pixel
        flat = images.reshape(n, h * w, c).astype(np.float64)
        counts = np.bincount(cell.ravel(), minlength=b * b)
        means = np.empty((n, b * b, c))
        for ch in range(c):  # per-cell mean by scatter-add, one channel at a time
            sums = np.zeros((n, b * b))
            np.add.at(sums, (slice(None), cell.ravel()), flat[:, :, ch])
            means[:, :, ch] = sums / counts
        return np.clip(means[:, cell.ravel()] + 0.5, 0, 255).astype(np.uint8).reshape(n, h, w, c)


@ANONYMIZERS.register("mask")
class MaskAnonymizer(Anonymizer):
    """Fills an ellipse over the face region (aligned crops) with a flat colour."""

    class Params(Strict):
        center: tuple[float, float] = (0.5, 0.5)  # fractions of the width and height
        radii: tuple[float, float] = (0.32, 0.4)
        value: int = Field(0, ge=0, le=255)

    def __call__(self, images: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        check_batch(images, seeds)
        _, h, w, _ = images.shape
        (cx, cy), (rx, ry) = self.p.center, self.p.radii
        yy, xx = np.mgrid[0:h, 0:w]
        inside = ((xx + 0.5) / w - cx) ** 2 / rx**2 + ((yy + 0.5) / h - cy) ** 2 / ry**2 <= 1.0
        out = images.copy()
        out[:, inside] = self.p.value
        return out


@ANONYMIZERS.register("resynth")
class StructureResynthesis(Anonymizer):
    """Keep the edge map and the shading order, redraw colour and texture: every region between edges is
    repainted from a random colour ramp indexed by the region's mean luminance (what a depth/edge-conditioned
    generator keeps), then new lighting and fine texture are added and the edges drawn in a random ink.
    ``edge_sigma`` sets how much structure survives (larger = only coarse edges)."""

    class Params(Strict):
        edge_sigma: float = Field(1.0, gt=0)
        texture: float = Field(10.0, ge=0)
        shading: float = Field(0.3, ge=0)
        draw_edges: bool = True

    def _one(self, image: np.ndarray, seed: int) -> np.ndarray:
        p = self.p
        rng = np.random.default_rng(seed)
        h, w, _ = image.shape
        gray = to_gray(image)
        edges = edge_map(gray, p.edge_sigma)
        regions, n = ndimage.label(~edges)
        lum = np.concatenate([[0.5], ndimage.mean(gray, regions, index=np.arange(1, n + 1))]) if n else np.full(1, 0.5)
        # a random ramp of three colours: dark, middle and bright tones of a new "style"
        stops = np.sort(rng.uniform(0, 255, size=(3, 3)), axis=0)[:, rng.permutation(3)]
        ramp = np.stack([np.interp(lum, [0.0, 0.5, 1.0], stops[:, c]) for c in range(3)], axis=1)
        out = ramp[regions]
        coarse = rng.normal(size=(4, 4, 1))
        shade = ndimage.zoom(coarse, (h / 4, w / 4, 1), order=1)[:h, :w]
        out = out * (1.0 + p.shading * np.tanh(shade)) + rng.normal(0, p.texture, size=out.shape)
        if p.draw_edges:
            out[edges] = rng.uniform(0, 80, size=3)
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)

    def __call__(self, images: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        check_batch(images, seeds)
        return np.stack([self._one(img, s) for img, s in zip(images, seeds)])
