"""One failed cell on the real loopback Slurm cluster costs only its own descendants.

The grid has three cells (identity, broken, blur); the loopback profile caps arrays at two tasks, so the
broken anonymization is a task of one array beside identity's, and blur's is a job of its own. The
broken cell's anonymizer is a diffusion model in a local folder whose UNet weights file was cut short (as
by an interrupted copy): planning checks the folder's diffusers layout, not every tensor, so the grid is
submitted, and the failure happens where it would on a cluster, when the job loads the weights. Its
training and evaluation are cancelled (Slurm's kill-on-invalid-dep on their own upstream task); the other
two cells train, evaluate and are collected. ``anonrisk grid status`` names the failure, its error and a
log that exists and holds it, and says why the descendants never ran.

Before per-task dependencies every training array waited for the whole anonymize array (``afterok:<id>``),
so this one failure cancelled every cell's training.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from tests.cluster.test_grid_slurm import _anonrisk, _env, _grid_job_ids, _sacct_tasks, _wait_until_unqueued

pytestmark = [pytest.mark.services, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
ERROR = "Unable to load weights from checkpoint file"  # diffusers' message for a truncated safetensors file


def _broken_model(path: Path) -> Path:
    from anonrisk.anonymize.tiny import save_random_model

    save_random_model(path, "tiny", seed=0, inpaint=False, controlnets=0)
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return path


def _grid(tmp: Path) -> Path:
    broken = {"name": "broken", "kind": "diffusion", "params": {"model": str(_broken_model(tmp / "model")), "steps": 2, "resolution": 32}}
    grid = {
        "name": "failure",
        "base": str(REPO / "configs" / "quickstart.yaml"),
        "profile": str(REPO / "configs" / "clusters" / "loopback.yaml"),
        "fixed": {"progress": False, "data.image_size": 32, "data.synthetic": {"identities": 30, "images_per_identity": 4, "seed": 0},
                  "train.backbone": "test_resnet", "train.steps": 8, "train.batch_size": 32, "train.checkpoint_every": 4,
                  "evaluate.bootstrap": 50, "evaluate.leakage": False, "tracking.mlflow": False},
        "axes": {"anonymizer": ["identity", broken, "blur"]},
    }
    path = tmp / "failure.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_a_failed_anonymization_costs_only_its_own_cell(slurm_cluster, tmp_path, timing):
    grid = _grid(tmp_path)
    env = _env(slurm_cluster)
    settings = [f"runs_dir={tmp_path / 'runs'}", f"results_dir={tmp_path / 'results'}"]
    t0 = time.monotonic()
    _anonrisk(env, "grid", "submit", str(grid), *settings, "--executor", "slurm")
    grid_dir = tmp_path / "runs" / "grids" / "failure"
    _wait_until_unqueued(slurm_cluster, _grid_job_ids(grid_dir), grid_dir, timeout=420)
    timing("grid: one failed cell of three", time.monotonic() - t0)

    state = json.loads((grid_dir / "jobs.json").read_text())
    nodes = {(rec["stage"], rec["cells"][0].removeprefix("anonymizer=")): rec for rec in state["nodes"].values() if rec["stage"] != "prepare"}
    anonymize = {name: rec["job_id"] for (stage, name), rec in nodes.items() if stage == "anonymize"}
    array = anonymize["identity"].split("_")[0]
    assert anonymize["broken"] == f"{array}_1" and "_" not in anonymize["blur"], anonymize  # broken beside identity
    for name in ("identity", "broken"):  # training task i waits for anonymization task i only
        train = nodes["train", name]
        assert train["dependency"] == f"aftercorr:{array}", train
        assert train["job_id"].split("_")[1] == anonymize[name].split("_")[1], (train, anonymize)
    assert nodes["train", "blur"]["dependency"] == f"afterok:{anonymize['blur']}"
    states = _sacct_tasks(slurm_cluster, _grid_job_ids(grid_dir))
    got = {key: states.get(rec["job_id"]) for key, rec in nodes.items()}
    want = {(s, n): "COMPLETED" for s in ("anonymize", "train", "evaluate") for n in ("identity", "blur")}
    want.update({("anonymize", "broken"): "FAILED", ("train", "broken"): "CANCELLED", ("evaluate", "broken"): "CANCELLED"})
    assert got == want, (got, states)
    doc = json.loads((tmp_path / "results" / "failure" / "metrics.json").read_text())
    assert sorted(c["id"] for c in doc["cells"]) == ["anonymizer=blur", "anonymizer=identity"]
    assert doc["missing"] == ["anonymizer=broken"]

    status = _anonrisk(env, "grid", "status", str(grid), *settings, check=False)
    assert status.returncode == 1 and not status.stderr.strip(), status  # problems: exit status 1, no traceback
    out = status.stdout
    problems = [line for line in out.splitlines() if line.startswith("  ! ")]
    assert len(problems) == 3, out
    failed = next(p for p in problems if p.startswith("  ! anonymize anonymizer=broken"))
    assert f"job {anonymize['broken']} FAILED" in failed and ERROR in failed, out
    log = Path(re.search(r", log (\S+)$", failed).group(1))
    assert log == grid_dir / "submitit" / anonymize["broken"] / f"{anonymize['broken']}_0_log.err", failed
    assert ERROR in log.read_text(), log.read_text()[-2000:]
    for stage in ("train", "evaluate"):
        line = next(p for p in problems if p.startswith(f"  ! {stage} anonymizer=broken"))
        assert "CANCELLED, never ran: upstream anonymize anonymizer=broken" in line and anonymize["broken"] in line, out
