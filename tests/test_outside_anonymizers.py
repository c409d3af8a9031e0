"""Issue 17 acceptance, one run: on a CelebA-format dataset, a blurred copy (precomputed folder), an external
command that copies its input and an entry-point plugin installed into a temporary path are scored with the
built-in identity and noise, with the privacy measures (verification, anonymity sets, verbatim audit)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_data import write_celeba
from tests.test_external import COPY, write_blurred

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = '''
import numpy as np
from anonrisk.anonymize.base import Anonymizer
from anonrisk.config.validation import Strict

class Mirror(Anonymizer):
    """A plugin kind: the image flipped left to right, darkened by ``params.darken``."""
    class Params(Strict):
        darken: int = 0

    def __call__(self, images, seeds):
        return np.clip(images[:, :, ::-1].astype(int) - self.p.darken, 0, 255).astype(np.uint8)
'''


def install_plugins(site: Path) -> None:
    """Two installed distributions, as pip leaves them (dist-info with entry_points.txt): one good, one broken."""
    site.mkdir()
    (site / "mirror_anon.py").write_text(PLUGIN)
    for dist, line in (("mirror-anon", "mirror = mirror_anon:Mirror"), ("broken-anon", "broken = no_such_module_x:Thing")):
        info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[anonrisk.anonymizers]\n{line}\n")


def anonrisk(args, site, cwd):
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "anonrisk", *args], capture_output=True, text=True, env=env, cwd=cwd)


@pytest.mark.slow  # one subprocess run of five anonymizers x the edge attack (about 30 s on 2 busy cores)
def test_outside_anonymizers_scored_with_the_builtin_ones(tmp_path):
    write_celeba(tmp_path / "celeba", identities=8, per_identity=4)
    site = tmp_path / "site"
    install_plugins(site)
    listing = anonrisk(["ls", "kinds"], site, tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "mirror         [mirror-anon] darken=0" in listing.stdout
    assert "broken         [broken-anon] FAILED" in listing.stdout and "precomputed    [anonrisk]" in listing.stdout

    from anonrisk.config.schema import DataConfig
    from anonrisk.pipeline import prepare_data

    data = {"dataset": "celeba", "root": str(tmp_path / "celeba"), "image_size": 32, "split": {"test_fraction": 0.5}}
    _, records = prepare_data(DataConfig(**data), str(tmp_path / "runs"), progress=False)
    blurred = write_blurred(tmp_path, records, radius=5)
    cfg = {"name": "outside", "runs_dir": str(tmp_path / "runs"), "results_dir": str(tmp_path / "results"), "progress": False,
           "data": data, "anonymize": {"shard_size": 8},
           "anonymizers": [{"name": "identity", "kind": "identity"}, {"name": "noise", "kind": "noise"},
                           {"name": "theirs-blur", "kind": "precomputed", "params": {"root": str(blurred)}},
                           {"name": "copy", "kind": "command", "params": {"command": COPY}},
                           {"name": "mirror", "kind": "mirror", "params": {"darken": 10}}],
           "attacks": ["edge"], "evaluate": {"bootstrap": 200, "verification": {"fars": [0.1, 0.01]}}, "tracking": {"mlflow": False}}
    (tmp_path / "outside.yaml").write_text(yaml.safe_dump(cfg))
    run = anonrisk(["run", "outside.yaml"], site, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads((tmp_path / "results" / "outside" / "metrics.json").read_text())
    res = doc["results"]
    top1 = {n: r["attacks"]["edge"]["protocols"]["full-ref/linkage"]["top1"]["value"] for n, r in res.items()}
    print(top1)
    assert res["copy"]["attacks"]["edge"]["protocols"] == res["identity"]["attacks"]["edge"]["protocols"]  # re-identified like identity
    assert top1["identity"] == 1.0
    assert top1["noise"] < top1["theirs-blur"] < top1["identity"]
    assert set(top1) == {"identity", "noise", "theirs-blur", "copy", "mirror"}
    # the privacy measures: verbatim copy 1.0 for identity (and its copy), about 0 for noise
    assert res["identity"]["verbatim"]["face"]["mean"] == 1.0 == res["copy"]["verbatim"]["face"]["mean"]
    assert res["noise"]["verbatim"]["face"]["mean"] < 0.05
    ver = res["identity"]["attacks"]["edge"]["verification"]["exclude-source"]["tar_at_far"]["0.1"]
    assert ver["value"] >= ver["ci95"][0] and ver["ci95"][0] <= ver["ci95"][1] and ver["resolved"]
    noise_set = res["noise"]["attacks"]["edge"]["anonymity"]["full-ref/linkage"]
    ident_set = res["identity"]["attacks"]["edge"]["anonymity"]["full-ref/linkage"]
    assert ident_set["rank_set"]["mean"] == 1.0 < noise_set["rank_set"]["mean"]
    report = (tmp_path / "results" / "outside" / "report.md").read_text()
    assert "1:1 verification" in report and "verbatim copy" in report and "effective anonymity set" in report
    board = (tmp_path / "results" / "outside" / "leaderboard.md").read_text()
    assert "TAR@FAR" in board and "| theirs-blur |" in board and "| mirror |" in board
