"""A small real-face dataset built from the face photos that ship with installed packages (no download).

Identities: scikit-image's ``astronaut`` (Eileen Collins), matplotlib's ``grace_hopper.jpg`` (Grace Hopper)
and the first ``n_lfw`` face images of scikit-image's ``lfw_subset`` (25 x 25 grey crops of Labeled Faces in
the Wild; each is taken as its own identity: the subset carries no names, so two may show one person).
Several "images" of one identity are views of its one photo: a random crop (scale and shift), a horizontal
flip, a colour gain per channel, a gamma change and a linear lighting gradient, drawn from a fixed seed.
Written as ``root/<identity>/<k>.png`` (the ``folder`` dataset layout).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 160


def base_faces(n_lfw: int) -> dict[str, np.ndarray]:
    import matplotlib
    import skimage.data

    faces = {}
    astro = skimage.data.astronaut()
    faces["collins"] = astro[40:220, 130:310]  # the face and a margin around dlib's detection (175..265, 76..166)
    with Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg") as im:
        hopper = np.asarray(im.convert("RGB"))
    faces["hopper"] = hopper[100:370, 140:410]  # around the detection (180..366, 139..325)
    lfw = skimage.data.lfw_subset()[:n_lfw]  # the first 100 of the 200 crops are faces
    for i, g in enumerate(lfw):
        faces[f"lfw{i:03d}"] = np.repeat((g * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    return faces


def view(face: np.ndarray, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """One photometric/geometric variant of a face photo."""
    h, w, _ = face.shape
    scale = rng.uniform(0.85, 1.0)
    ch, cw = int(h * scale), int(w * scale)
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    im = Image.fromarray(face[top : top + ch, left : left + cw]).resize((size, size), Image.BICUBIC)
    x = np.asarray(im).astype(np.float64) / 255.0
    if rng.random() < 0.5:
        x = x[:, ::-1]
    x = x ** rng.uniform(0.75, 1.35)  # gamma
    x = x * rng.uniform(0.8, 1.15, size=3)  # colour gain per channel
    ramp = np.linspace(-1, 1, size)
    direction = rng.uniform(-1, 1, size=2)
    x = x * (1 + 0.15 * (direction[0] * ramp[None, :, None] + direction[1] * ramp[:, None, None]))  # lighting
    return np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8)


def build_real_faces(root: str | Path, n_lfw: int = 22, variants: int = 4, seed: int = 0) -> Path:
    from anonrisk.data.io import save_image

    root = Path(root)
    for k, (name, face) in enumerate(sorted(base_faces(n_lfw).items())):
        rng = np.random.default_rng([seed, k])
        for j in range(variants):
            path = root / name / f"{j}.png"
            if not path.exists():
                save_image(path, view(face, rng))
    return root
