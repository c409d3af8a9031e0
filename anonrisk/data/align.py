"""Face detection and alignment of in-the-wild photos to a fixed crop (a pure function of one image).

dlib's HOG frontal face detector finds the faces (``upsample`` times upsampled for small ones); the largest
is aligned by its 5 landmarks (``shape_predictor_5_face_landmarks.dat`` from the face-recognition-models
package, offline) with ``dlib.get_face_chip``: eyes and nose at fixed positions of a ``size`` square,
``padding`` the margin around the face (0.25: a face crop like CelebA's aligned images)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np

from anonrisk.errors import Unavailable

LANDMARKS = "shape_predictor_5_face_landmarks.dat"


@lru_cache(maxsize=2)
def _nets(models_dir: Optional[str]):
    try:
        import dlib
    except ImportError:
        raise Unavailable("face alignment needs dlib: pip install 'anonrisk[recognizers]'") from None
    if models_dir is None:
        from anonrisk.evaluate.recognizers import face_recognition_models_dir

        found = face_recognition_models_dir()
        if found is None:
            raise Unavailable("face alignment needs the face-recognition-models package (pip install 'anonrisk[recognizers]') "
                              "or data.wild.models_dir")
        models_dir = str(found)
    path = Path(models_dir) / LANDMARKS
    if not path.exists():
        raise Unavailable(f"face alignment: landmark model not found: {path}")
    return dlib, dlib.get_frontal_face_detector(), dlib.shape_predictor(str(path))


def align_face(image: np.ndarray, size: int, padding: float = 0.25, upsample: int = 1,
               models_dir: Optional[str] = None) -> Optional[np.ndarray]:
    """The largest face of ``image`` (H, W, 3 uint8) aligned to a ``size`` square, or None when none is found."""
    dlib, detect, landmarks = _nets(models_dir)
    image = np.ascontiguousarray(image)
    faces = detect(image, upsample)
    if not len(faces):
        return None
    face = max(faces, key=lambda r: r.width() * r.height())
    return np.asarray(dlib.get_face_chip(image, landmarks(image, face), size=size, padding=padding), dtype=np.uint8)
