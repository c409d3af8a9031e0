"""Leakage sweeps: parameter paths, clear errors, and a small sweep end to end (blur sigma, edge attack)."""

import json
from pathlib import Path

import pytest

from anonrisk.errors import ConfigError
from anonrisk.launch.sweep import Sweep, load_sweeps, run_sweeps, set_param, sweep_specs


def test_set_param_follows_dicts_and_list_indices_and_copies():
    params = {"conditions": [{"name": "canny", "scale": 1.0}], "steps": 4}
    out = set_param(params, "conditions.0.scale", 0.25, "k")
    assert out["conditions"][0]["scale"] == 0.25 and params["conditions"][0]["scale"] == 1.0
    with pytest.raises(ConfigError, match=r"k: conditions.3 is not an index of a list of 1"):
        set_param(params, "conditions.3.scale", 0.5, "k")
    with pytest.raises(ConfigError, match=r"k: prompt does not exist"):
        set_param(params, "prompt.x", 1, "k")


def test_sweep_points_are_validated_anonymizers(tmp_path):
    specs = sweep_specs([Sweep(name="s", base="controlnet-canny-tiny", param="conditions.0.scale", values=[0.0, 0.5])], None)
    assert [s.name for _, _, s in specs] == ["s=0.0", "s=0.5"] and specs[1][2].params["conditions"][0]["scale"] == 0.5
    with pytest.raises(ConfigError, match=r"sweeps\[0\] \(b\): sigma=-1.0: anonymizer 'blur': params.sigma: Input should be greater than 0"):
        sweep_specs([Sweep(name="b", base="blur", param="sigma", values=[-1.0])], None)
    bad = tmp_path / "bad.yaml"
    bad.write_text("sweeps:\n  - {name: b, base: blur, param: sigma, valuez: [1]}\n")
    with pytest.raises(ConfigError, match=r"sweeps.0.valuez: unknown key; valid keys here: name, base, param, values"):
        load_sweeps(bad)


def test_small_blur_sweep_end_to_end(tmp_path):
    from anonrisk.config import load_config

    cfg = load_config("configs/quickstart.yaml", [
        f"runs_dir={tmp_path}/runs", f"results_dir={tmp_path}/results", "progress=false", "tracking.mlflow=false", "name=sw",
        "data.synthetic.identities=24", "data.synthetic.images_per_identity=4", "attacks=[edge]", "evaluate.bootstrap=100"])
    summary = run_sweeps(cfg, [Sweep(name="blur", base="blur", param="sigma", values=[0.01, 0.2])])
    out = Path(summary["results_dir"])
    saved = json.loads((out / "sweep.json").read_text())
    points = saved["sweeps"][0]["points"]
    assert [p["value"] for p in points] == [0.01, 0.2]
    sharp, flat = points
    # more blur, fewer edges kept, fewer people found by their edges
    assert sharp["leakage"]["edge_ssim"] > flat["leakage"]["edge_ssim"] + 0.5
    assert sharp["attacks"]["edge"]["full-ref/linkage"]["value"] > flat["attacks"]["edge"]["full-ref/linkage"]["value"] + 0.3
    assert (out / "plots" / "sweep_blur.png").stat().st_size > 1000 and "| 0.2 |" in (out / "sweep.md").read_text()
    assert json.loads((out / "leaderboard.json").read_text())["rows"][0]["anonymizer"] == "blur=0.2"
