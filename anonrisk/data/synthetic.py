"""The embedded default dataset: procedurally drawn faces whose geometry is the identity.

An identity is a vector of shape parameters (face outline, eye spacing and size, brows, nose, mouth,
hairline); every image of it redraws those shapes under per-image nuisance (pose, expression, lighting,
background, colour jitter, sensor noise). Geometry and skin/hair tone carry the identity, so an attack has
something real to find and an anonymizer that keeps edges leaks it. Deterministic from the seed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# (name, low, high) of every identity parameter, in fractions of the image side
IDENTITY_PARAMS = [
    ("face_rx", 0.27, 0.40), ("face_ry", 0.34, 0.46), ("jaw", 0.0, 1.0),
    ("eye_dx", 0.09, 0.17), ("eye_y", 0.40, 0.50), ("eye_rx", 0.03, 0.065), ("eye_ry", 0.018, 0.04),
    ("brow_dy", 0.045, 0.10), ("brow_tilt", -0.35, 0.35), ("brow_len", 0.05, 0.10),
    ("nose_len", 0.06, 0.15), ("nose_w", 0.025, 0.07),
    ("mouth_y", 0.64, 0.76), ("mouth_w", 0.07, 0.17), ("mouth_curve", -0.03, 0.03),
    ("hair_y", 0.10, 0.26), ("hair_peak", -0.06, 0.08), ("ear", 0.0, 0.06),
    # tones (0-255), not fractions
    ("skin_r", 90, 250), ("skin_g", 60, 210), ("skin_b", 40, 190), ("hair_r", 0, 140), ("hair_g", 0, 120), ("hair_b", 0, 120),
]


def identity_params(seed: int, identity: int) -> dict[str, float]:
    rng = np.random.default_rng([seed, identity, 7])
    return {name: float(rng.uniform(lo, hi)) for name, lo, hi in IDENTITY_PARAMS}


def render_face(params: dict[str, float], size: int, rng: np.random.Generator) -> np.ndarray:
    """One image of the identity ``params`` with nuisance from ``rng``; RGB uint8 (size, size, 3)."""
    S = size * 3  # draw at 3x and downsample: anti-aliased, sub-pixel geometry survives
    p = params
    bg = tuple(int(c) for c in rng.uniform(0, 255, 3))
    # skin and hair tone belong to the identity (as in real faces); each image jitters them (white balance)
    skin = np.clip(np.array([p["skin_r"], p["skin_g"], p["skin_b"]]) + rng.normal(0, 12, 3), 0, 255)
    hair = tuple(int(c) for c in np.clip(np.array([p["hair_r"], p["hair_g"], p["hair_b"]]) + rng.normal(0, 12, 3), 0, 255))
    ink = tuple(int(c) for c in rng.uniform(0, 60, 3))
    smile = rng.normal(0, 0.012)  # expression
    blink = float(np.clip(rng.normal(1.0, 0.15), 0.5, 1.3))

    im = Image.new("RGB", (S, S), bg)
    d = ImageDraw.Draw(im)
    cx, cy = 0.5 * S, 0.52 * S
    rx, ry = p["face_rx"] * S, p["face_ry"] * S
    box = lambda x, y, ax, ay: [x - ax, y - ay, x + ax, y + ay]  # noqa: E731

    # ears, hair mass, face outline (jaw squares the lower half)
    er = p["ear"] * S
    if er > 0.01 * S:
        for sgn in (-1, 1):
            d.ellipse(box(cx + sgn * rx, cy, er, er * 1.6), fill=tuple(int(c) for c in skin * 0.9))
    d.ellipse(box(cx, cy - 0.06 * S, rx * 1.08, ry * 1.02), fill=hair)
    d.ellipse(box(cx, cy, rx, ry), fill=tuple(int(c) for c in skin))
    jaw_h = ry * 0.55 * p["jaw"]
    if jaw_h > 1:
        d.rectangle([cx - rx * 0.82, cy + ry * 0.35, cx + rx * 0.82, cy + ry * 0.35 + jaw_h], fill=tuple(int(c) for c in skin))
    # hairline: a band across the top of the face with an optional peak
    top = cy - ry
    hy = p["hair_y"] * S
    d.polygon([(cx - rx, top), (cx + rx, top), (cx + rx, hy + 0.05 * S), (cx, hy + (0.05 + p["hair_peak"]) * S), (cx - rx, hy + 0.05 * S)], fill=hair)
    # eyes, pupils, brows
    ey = p["eye_y"] * S
    for sgn in (-1, 1):
        ex = cx + sgn * p["eye_dx"] * S
        d.ellipse(box(ex, ey, p["eye_rx"] * S, p["eye_ry"] * S * blink), fill=(245, 245, 245), outline=ink, width=max(1, S // 96))
        d.ellipse(box(ex, ey, p["eye_ry"] * S * 0.7, p["eye_ry"] * S * 0.7 * blink), fill=ink)
        by = ey - p["brow_dy"] * S
        bl = p["brow_len"] * S
        tilt = sgn * p["brow_tilt"] * bl
        d.line([(ex - bl, by + tilt), (ex + bl, by - tilt)], fill=hair, width=max(2, S // 40))
    # nose
    nl, nw = p["nose_len"] * S, p["nose_w"] * S
    d.line([(cx, ey), (cx - nw, ey + nl), (cx + nw * 0.3, ey + nl)], fill=ink, width=max(1, S // 64), joint="curve")
    # mouth: a curve whose bend is identity (resting shape) + expression
    my, mw = p["mouth_y"] * S, p["mouth_w"] * S
    bend = (p["mouth_curve"] + smile) * S
    xs = np.linspace(-1, 1, 16)
    d.line([(cx + x * mw, my + bend * (1 - x * x)) for x in xs], fill=(150, 40, 50), width=max(2, S // 36))

    # pose: small rotation, scale and shift
    angle = rng.normal(0, 5)
    scale = float(np.clip(rng.normal(1.06, 0.04), 1.0, 1.15))  # zoom in only: no canvas edge shows
    shift = rng.normal(0, 0.025 * S, 2)
    im = im.rotate(angle, resample=Image.BILINEAR, translate=tuple(shift), fillcolor=bg)
    crop = S * (1 - 1 / scale) / 2
    im = im.crop((crop, crop, S - crop, S - crop)).resize((size, size), Image.LANCZOS)

    # lighting: a random linear gradient; sensor noise
    arr = np.asarray(im, dtype=np.float32)
    g = rng.normal(0, 1, 2)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    light = 1.0 + 0.35 * np.tanh(g[0] * xx + g[1] * yy)
    arr = arr * light[..., None] + rng.normal(0, 4.0, arr.shape)
    return np.clip(arr + 0.5, 0, 255).astype(np.uint8)


def render_image(seed: int, identity: int, index: int, size: int) -> np.ndarray:
    rng = np.random.default_rng([seed, identity, index])
    return render_face(identity_params(seed, identity), size, rng)
