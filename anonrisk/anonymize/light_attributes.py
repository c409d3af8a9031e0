"""CAMOUFLaGE-Light's attribute encoding (arXiv 2403.14790): per person, 40 facial attributes (the CelebA
set) and K keypoints, written as separate channels at the person's position in a map the size of the
U-Net's input image: channel a < 40 holds attribute a's probability inside the face box, channel 40 + k a
Gaussian at keypoint k. The T2I-Adapter reads this map instead of the face.

Extractors (``attributes:``), each mapping one uint8 image to [(box, 40 probabilities, K keypoints)]:
- ``random``: a random-weight stand-in (tests): a seeded linear read-out of the face box's pooled pixels;
- ``dlib``: dlib's HOG face detector and 5-point shape predictor (face-recognition-models' file, offline):
  keypoints only, the 40 attribute channels stay 0;
- ``facer``: FACER's attribute and landmark models from local weights (not wired yet: Unavailable).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from anonrisk.errors import Unavailable

N_ATTRIBUTES = 40
N_KEYPOINTS = 5
#: the face of an aligned crop (x0, y0, x1, y1 as fractions), when no detector is used
ALIGNED_FACE = (0.2, 0.2, 0.8, 0.85)

Face = tuple[tuple[float, float, float, float], np.ndarray, np.ndarray]  # box (px), (40,), (K, 2) px


def random_extractor(seed: int) -> Callable[[np.ndarray], list[Face]]:
    rng = np.random.default_rng([seed, 0xA771])
    w_attr = rng.normal(0, 1.5, (N_ATTRIBUTES, 3 * 16))
    w_kp = rng.normal(0, 0.5, (N_KEYPOINTS * 2, 3 * 16))

    def extract(image: np.ndarray) -> list[Face]:
        h, w, _ = image.shape
        x0, y0, x1, y1 = ALIGNED_FACE[0] * w, ALIGNED_FACE[1] * h, ALIGNED_FACE[2] * w, ALIGNED_FACE[3] * h
        crop = image[int(y0):int(y1), int(x0):int(x1)].astype(np.float64) / 255.0
        ys = np.array_split(np.arange(crop.shape[0]), 4)
        xs = np.array_split(np.arange(crop.shape[1]), 4)
        pooled = np.array([crop[np.ix_(a, b)].mean((0, 1)) for a in ys for b in xs]).reshape(-1) - 0.5
        attrs = 1 / (1 + np.exp(-(w_attr @ pooled)))
        rel = 1 / (1 + np.exp(-(w_kp @ pooled))).reshape(N_KEYPOINTS, 2)
        kps = np.stack([x0 + rel[:, 0] * (x1 - x0), y0 + rel[:, 1] * (y1 - y0)], 1)
        return [((x0, y0, x1, y1), attrs, kps)]

    return extract


def dlib_extractor(upsample: int = 1) -> Callable[[np.ndarray], list[Face]]:
    import dlib

    from anonrisk.evaluate.recognizers import face_recognition_models_dir

    d = face_recognition_models_dir()
    if d is None:
        raise Unavailable("params.attributes: dlib needs face-recognition-models' shape_predictor_5_face_landmarks.dat "
                          "(pip install 'anonrisk[recognizers]')")
    detector = dlib.get_frontal_face_detector()
    shape = dlib.shape_predictor(str(d / "shape_predictor_5_face_landmarks.dat"))

    def extract(image: np.ndarray) -> list[Face]:
        img = np.ascontiguousarray(image)
        out = []
        for r in detector(img, upsample):
            pts = shape(img, r)
            kps = np.array([[pts.part(k).x, pts.part(k).y] for k in range(N_KEYPOINTS)], np.float64)
            out.append(((r.left(), r.top(), r.right(), r.bottom()), np.zeros(N_ATTRIBUTES), kps))
        return out

    return extract


def make_extractor(kind: str, seed: int = 0, weights: Optional[str] = None) -> Callable[[np.ndarray], list[Face]]:
    if kind == "random":
        return random_extractor(seed)
    if kind == "dlib":
        return dlib_extractor()
    raise Unavailable(f"params.attributes: {kind!r} (FACER from {weights!r}) is not wired into anonrisk yet; "
                      f"use attributes: dlib (keypoints) or random (tests)")


def encode(faces: list[Face], h: int, w: int, sigma: float = 1.5) -> np.ndarray:
    """The (40 + K, h, w) float32 map of one image's persons (later persons overwrite earlier ones)."""
    out = np.zeros((N_ATTRIBUTES + N_KEYPOINTS, h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    for (x0, y0, x1, y1), attrs, kps in faces:
        box = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
        out[:N_ATTRIBUTES, box] = np.asarray(attrs, np.float32)[:, None]
        for k, (kx, ky) in enumerate(kps):
            out[N_ATTRIBUTES + k] = np.maximum(out[N_ATTRIBUTES + k], np.exp(-((xx - kx) ** 2 + (yy - ky) ** 2) / (2 * sigma**2)))
    return out
