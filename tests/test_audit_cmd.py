"""``anonrisk audit ORIGINALS ANONYMIZED``: a privacy report for two folders, no config."""

import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from anonrisk.cli import main
from anonrisk.data.synthetic import render_image


@pytest.mark.slow  # two audits, the dlib recognizer in the first (10-40 s on 2 busy cores)
def test_audit_of_two_folders_reports_linkage_verbatim_and_what_did_not_run(tmp_path, capsys):
    orig, copy, noisy = tmp_path / "orig", tmp_path / "copy", tmp_path / "noisy"
    rng = np.random.default_rng(0)
    for k in range(10):
        rel = f"batch{k % 2}/{k:04d}"
        img = render_image(4, k, 0, 40)
        for root, out, ext in ((orig, img, ".png"), (copy, img, ".png"), (noisy, rng.integers(0, 256, img.shape, dtype=np.uint8), ".jpg")):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            if root == copy and k == 4:  # a test record in the middle: pairs must stay matched by id
                continue  # one original without its anonymized image
            Image.fromarray(out).save(root / f"{rel}{ext}")
    assert main(["audit", str(orig), str(copy), "--out", str(tmp_path / "a-copy"), "--image-size", "32"]) == 0
    text = capsys.readouterr().out
    assert "1 originals had no usable anonymized image" in text
    assert "edge full-ref/linkage: top-1 1.000" in text and "verbatim copy: 1.000 of the face region unchanged" in text
    assert "cross-image re-identification (exclude-source): the originals carry no identity labels" in text
    assert "trained attacks" in text and "LPIPS" in text  # no LPIPS weights given: said, not hidden
    doc = json.loads((tmp_path / "a-copy" / "metrics.json").read_text())
    card = doc["results"]["anonymized"]
    assert card["verbatim"]["face"]["mean"] == 1.0 and card["attacks"]["edge"]["verification"]["linkage"]["tar_at_far"]
    assert (tmp_path / "a-copy" / "audit.md").read_text().startswith("# anonrisk audit: a-copy")
    assert main(["audit", str(orig), str(noisy), "--out", str(tmp_path / "a-noise"), "--image-size", "32", "--no-recognizer"]) == 0
    noise = json.loads((tmp_path / "a-noise" / "metrics.json").read_text())["results"]["anonymized"]
    assert noise["verbatim"]["face"]["mean"] < 0.05
    assert noise["attacks"]["edge"]["protocols"]["full-ref/linkage"]["top1"]["value"] < 0.6
    assert main(["audit", str(orig), str(tmp_path / "nowhere")]) == 2
    assert "ANONYMIZED folder not found" in capsys.readouterr().err
