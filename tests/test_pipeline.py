"""End to end on the quickstart data: known answers, a free rerun, resume after a kill."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anonrisk.config import load_config
from anonrisk.pipeline import Pipeline
from tests.process_helpers import sigkill_at_first_checkpoint

MAIN = "full-ref/exclude-source"


def quick_cfg(tmp, *overrides):
    return load_config("configs/quickstart.yaml", [f"runs_dir={tmp}/runs", f"results_dir={tmp}/results", "progress=false", *overrides])


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quickstart")
    cfg = quick_cfg(tmp, f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db")
    t0 = time.perf_counter()
    old_umask = os.umask(0o022)  # the usual default: results must come out group- and world-readable
    try:
        doc = Pipeline(cfg).run()
    finally:
        os.umask(old_umask)
    print(f"\nquickstart pipeline: {time.perf_counter() - t0:.0f} s")
    return tmp, cfg, doc


def top1(doc, name, key=MAIN, attack="contrastive"):
    return doc["results"][name]["attacks"][attack]["protocols"][key]["top1"]


@pytest.mark.slow
def test_known_answers(quickstart):
    _, cfg, doc = quickstart
    assert cfg.train.input == "rgb"  # the paper's attacker: the image only, no edge front end
    chance = top1(doc, "noise")["chance"]
    linkage = top1(doc, "identity", "full-ref/linkage")["value"]
    assert linkage >= 0.95  # the upper bound: a probe identical to one reference
    noise = top1(doc, "noise")
    lo, hi = noise["chance_ci95"]  # what a chance-level attacker scores on as many probes, 95 % of the time
    assert lo <= noise["value"] <= hi, noise
    for name in ("blur", "pixelate"):
        v = top1(doc, name)
        assert v["ci95"][0] > hi and v["value"] < linkage, (name, v)
    # the finding: a redraw that keeps the edges looks like a stranger yet is re-identified far above chance
    # by the RGB-only attacker (its whole interval above the chance interval)
    resynth = top1(doc, "resynth")
    assert resynth["ci95"][0] > hi and resynth["value"] >= 5 * chance, resynth
    # the mechanism: resynthesis keeps edges (leakage) where noise does not, and an attacker with no access
    # to the anonymizer finds people by their edges alone
    assert top1(doc, "resynth", attack="edge")["ci95"][0] > top1(doc, "resynth", attack="edge")["chance_ci95"][1]
    assert doc["results"]["resynth"]["leakage"]["edge_ssim"] > doc["results"]["noise"]["leakage"]["edge_ssim"] + 0.2


@pytest.mark.slow
def test_results_dir_and_mlflow(quickstart):
    tmp, cfg, doc = quickstart
    out = Path(doc["results_dir"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["schema"] == "anonrisk.results" and saved["schema_version"] == 2
    env = saved["environment"]  # how the numbers were made
    assert env["packages"]["torch"] and env["packages"]["diffusers"] and "commit" in env["git"]
    train = env["stages"]["anonymizers"]["resynth"]["train"]["contrastive"]
    assert train["device"].startswith("cpu") and train["precision"] == "fp32" and train["engine"] == "torch"
    assert env["stages"]["anonymizers"]["resynth"]["anonymize"]["runtime"]
    for f in out.rglob("*"):  # written under umask 022: readable by the group and others
        assert f.stat().st_mode & 0o044 == 0o044, (f, oct(f.stat().st_mode))
    assert (out / "report.md").read_text().count("| resynth |") == 1
    assert (out / "plots" / "reid.png").stat().st_size > 1000 and (out / "plots" / "leakage_vs_reid.png").exists()
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(children) == 6
    ident = next(r for r in children if r.data.tags["anonrisk.anonymizer"] == "identity")
    assert ident.data.metrics["contrastive/top1"] == top1(doc, "identity")["value"]
    assert ident.data.metrics["edge/top1_norm"] == top1(doc, "identity", attack="edge")["normalized"]
    assert ident.data.metrics["worst/linkage_top1"] == max(top1(doc, "identity", "full-ref/linkage", a)["value"] for a in ("contrastive", "edge"))
    parent = next(r for r in runs if not r.data.tags.get("mlflow.parentRunId"))
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "metrics.json" in artifacts and not any(a.endswith((".jpg", ".png")) for a in artifacts if "plots" not in a)


@pytest.mark.slow
def test_second_run_does_no_work_and_gives_identical_metrics(quickstart):
    tmp, cfg, doc = quickstart
    before = (Path(doc["results_dir"]) / "metrics.json").read_bytes()
    stamps = {p: p.stat().st_mtime_ns for p in Path(tmp, "runs").glob("*/**/DONE")}
    t0 = time.perf_counter()
    again = Pipeline(quick_cfg(tmp, f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db")).run()
    assert time.perf_counter() - t0 < 20
    assert again["results"] == doc["results"]
    assert (Path(doc["results_dir"]) / "metrics.json").read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in Path(tmp, "runs").glob("*/**/DONE")} == stamps


def _train_cmd(tmp):
    return [sys.executable, "-m", "anonrisk", "train", "configs/quickstart.yaml", f"runs_dir={tmp}/runs", f"results_dir={tmp}/results",
            "anonymizers=[blur]", "attack.backbone=test_resnet", "attack.steps=40", "attack.checkpoint_every=5",
            "attack.batch_size=32", "data.synthetic.identities=40", "progress=false"]


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_model(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(_train_cmd(tmp_path / "ref"), env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr

    stage = sigkill_at_first_checkpoint(_train_cmd(tmp_path / "killed"), env, tmp_path / "killed" / "runs", timeout=120)

    resumed = subprocess.run(_train_cmd(tmp_path / "killed"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    done = json.loads((stage / "DONE").read_text())
    assert done["resumed_from"] >= 5
    ref_stage = next((tmp_path / "ref" / "runs" / "train").glob("*/"))
    assert ref_stage.name == stage.name  # same fingerprint
    from safetensors.torch import load_file

    a, b = load_file(str(ref_stage / "encoder.safetensors")), load_file(str(stage / "encoder.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
    # the loss log matches the uninterrupted run step for step
    assert (ref_stage / "log.jsonl").read_text().splitlines()[-1] == (stage / "log.jsonl").read_text().splitlines()[-1]
