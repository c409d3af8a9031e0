"""The verbatim-copy leak of instance-aug-faithful beside instance-aug, on the same synthetic faces.

    python benchmarks/faithful_leak.py                 # the -tiny presets, 16 faces at 64 px (CPU, ~1 min)
    python benchmarks/faithful_leak.py --suffix "" --size 512 --n 200 --device cuda   # the real presets

Both presets anonymize the same faces with the same seeds; ``anonrisk.evaluate.audit.verbatim_copy_audit``
counts the pixels equal to the original's (tolerance 0) in the image and in the face box. Not a timing: the
numbers are exact and machine-independent. Writes ``results/benchmarks/faithful_leak.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def leak_table(n: int, size: int, suffix: str = "-tiny", device: str = "cpu") -> dict:
    from anonrisk.anonymize import build_anonymizer
    from anonrisk.config.loader import preset_dirs, resolve_anonymizer
    from anonrisk.data.synthetic import render_image
    from anonrisk.evaluate.audit import verbatim_copy_audit

    faces = np.stack([render_image(0, i, 0, size) for i in range(n)])
    seeds = list(range(1000, 1000 + n))
    rows = {}
    for name in (f"instance-aug{suffix}", f"instance-aug-faithful{suffix}"):
        a = build_anonymizer(resolve_anonymizer(name, preset_dirs(None), 0))
        a.setup(device)
        out = np.concatenate([a(faces[i:i + 8], seeds[i:i + 8]) for i in range(0, n, 8)])
        audit = verbatim_copy_audit(zip(faces, out))
        rows[name] = {"image_copied": audit["image"]["mean"], "face_copied": audit["face"]["mean"],
                      "pasted_faces": audit["pasted_faces"], "kept_original": list(getattr(a, "kept_original", []))}
    return {"n": n, "size": size, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--suffix", default="-tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="results/benchmarks")
    a = ap.parse_args()
    res = leak_table(a.n, a.size, a.suffix, a.device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "faithful_leak.json").write_text(json.dumps(res, indent=1))
    lines = [f"Verbatim-copy audit, {res['n']} synthetic faces at {res['size']} px, same seeds (tolerance 0)", "",
             "| preset | image copied | face box copied | faces >= 99% copied |", "|---|---|---|---|"]
    for name, r in res["rows"].items():
        lines.append(f"| {name} | {r['image_copied']:.3f} | {r['face_copied']:.3f} | {r['pasted_faces']:.3f} |")
    (out / "faithful_leak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
