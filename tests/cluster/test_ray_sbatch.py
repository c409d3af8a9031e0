"""slurm/ray_cluster.sbatch on the real one-node Slurm cluster: Ray head in an srun step, the anonymize stage
on it, same images as the single-process runner, and no Ray process left when the job ends."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from anonrisk.config import load_config
from anonrisk.data.io import load_image
from anonrisk.data.records import read_manifest
from anonrisk.pipeline import Pipeline
from anonrisk.stages import read_json

REPO = Path(__file__).resolve().parents[2]


def _ray_processes_under(tmp: str) -> list[str]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if tmp.encode() in (d / "cmdline").read_bytes():
                    found.append(d.name)
            except OSError:
                pass
    return found


@pytest.mark.slow
@pytest.mark.services
def test_ray_cluster_sbatch_runs_the_stage(slurm_cluster, tmp_path, timing):
    raw = {"runs_dir": str(tmp_path / "runs"), "progress": False, "anonymizers": ["resynth"],
           "data": {"image_size": 64, "synthetic": {"identities": 6, "images_per_identity": 4}},
           "anonymize": {"shard_size": 4, "batch_size": 4}}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    ray_tmp = tempfile.mkdtemp(prefix="anonrisk-rs-", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = ",".join(["ALL", f"PYTHONPATH={REPO}", "OMP_NUM_THREADS=1", "RAY_AUTH_MODE=disabled",
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0", f"ANONRISK_PYTHON={sys.executable}", f"ANONRISK_RAY_TMP={ray_tmp}",
                    "ANONRISK_RAY_HEAD_IP=127.0.0.1"])
    t = time.monotonic()
    job = slurm_cluster.run("sbatch", "--parsable", "--nodes=1", f"--export={env}", "-o", str(tmp_path / "job-%j.out"),
                            str(REPO / "slurm" / "ray_cluster.sbatch"), str(cfg)).stdout.strip()
    try:
        slurm_cluster.wait_sacct(job, "COMPLETED", timeout=240)
    except AssertionError:
        out = next(tmp_path.glob("job-*.out"), None)
        raise AssertionError(out.read_text()[-4000:] if out else "no job output") from None
    timing("slurm: ray_cluster.sbatch (head + anonymize 24 images)", time.monotonic() - t)

    stage = next((tmp_path / "runs" / "anonymize").glob("*/*/DONE")).parent
    assert read_json(stage / "DONE")["runner"] == "ray"
    local = Pipeline(load_config(cfg, [f"runs_dir={tmp_path / 'local'}"]))
    ref = local.anonymize(local.cfg.anonymizers[0]).path
    a = {r.id: load_image(r.path) for r in read_manifest(stage / "manifest.jsonl")}
    b = {r.id: load_image(r.path) for r in read_manifest(ref / "manifest.jsonl")}
    assert sorted(a) == sorted(b) and len(a) == 24 and all(np.array_equal(a[k], b[k]) for k in a)
    # the job's end took the Ray head (an srun step) down with everything it started
    deadline = time.monotonic() + 30
    while _ray_processes_under(ray_tmp) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes_under(ray_tmp)
    os.system(f"rm -rf {ray_tmp}")
