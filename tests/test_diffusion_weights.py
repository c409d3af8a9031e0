"""``anonrisk weights``: the download list of presets and grids, and ``--fetch`` through huggingface_hub's
own ``snapshot_download`` from a hub mirror on loopback (``HF_ENDPOINT``, tests/hub_mirror.py), after which
the anonymizer loads the fetched folders through ``ANONRISK_WEIGHTS``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anonrisk.launch import weights

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from hub_mirror import serve  # noqa: E402

MINI = """kind: diffusion
params:
  model: tinyorg/tiny-sd
  conditions: [{name: canny, scale: 1.0}]
  controlnets: [tinyorg/tiny-canny]
  annotator_weights: {hed: weights/annotators/ControlNetHED.pth, pidinet: weights/annotators/table5_pidinet.pth}
  steps: 2
  resolution: 32
"""


def cli(*args, cwd, env=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "anonrisk.cli", "weights", *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_full_grid_lists_every_model_with_a_source(tmp_path):
    items = weights.needs(str(REPO / "configs/grids/full.yaml"), str(tmp_path))
    whats = {n.what for n in items}
    for name in ("instance-aug", "controlnet-canny", "controlnet-depth", "camouflage-base"):
        assert f"anonymizer {name}: params.model" in whats
    assert "anonymizer camouflage-base: params.controlnets[4]" in whats  # the five ControlNets
    assert "anonymizer instance-aug: params.annotator_weights.depth_anything" in whats
    assert any(n.what.startswith("attack recognizer") for n in items)
    # every entry has a known source (a hub repo, a pip package, or the reason there is none)
    assert not [n.what for n in items if "unknown" in n.source]
    inpaint = next(n for n in items if n.what == "anonymizer instance-aug: params.model")
    assert inpaint.source == "hf:stable-diffusion-v1-5/stable-diffusion-inpainting"
    assert inpaint.local == tmp_path / "stable-diffusion-v1-5/stable-diffusion-inpainting" and not inpaint.present()
    hed = next(n for n in items if n.what == "anonymizer instance-aug: params.annotator_weights.hed")
    assert (hed.source, hed.files, hed.local) == ("hf:lllyasviel/Annotators", ("ControlNetHED.pth",), tmp_path / "annotators/ControlNetHED.pth")
    ident = next(n for n in items if n.what == "anonymizer camouflage-base: params.identity_controlnet")
    assert ident.source.startswith("none (unreleased")


def test_cli_lists_and_names_a_bad_target(tmp_path):
    r = cli("camouflage-base-paper", "--root", str(tmp_path), cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "hf:SG161222/Realistic_Vision_V5.1_noVAE" in r.stdout and "hf:stabilityai/sd-vae-ft-mse" in r.stdout
    assert r.stdout.strip().endswith("14 needed, 14 missing")
    r = cli("no-such-preset", cwd=REPO)
    assert r.returncode == 2 and "neither an anonymizer preset nor a grid" in r.stderr and "Traceback" not in r.stderr


def test_fetch_from_a_loopback_hub_mirror_then_run_from_the_weights_root(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    from anonrisk.anonymize.tiny import save_random_model

    mirror = tmp_path / "mirror"
    paths = save_random_model(tmp_path / "build", "tiny", seed=0, controlnets=1)
    shutil.move(paths["controlnets"][0], mirror / "tinyorg/tiny-canny")
    (mirror / "tinyorg/tiny-canny/diffusion_pytorch_model.bin").write_bytes(b"not wanted")  # outside the patterns
    shutil.move(paths["model"], mirror / "tinyorg/tiny-sd")
    (mirror / "tinyorg/tiny-sd/v1-5-pruned.ckpt").write_bytes(b"a single-file checkpoint: not wanted")
    (mirror / "lllyasviel/Annotators").mkdir(parents=True)
    (mirror / "lllyasviel/Annotators/ControlNetHED.pth").write_bytes(b"hed")
    (mirror / "lllyasviel/Annotators/sk_model.pth").write_bytes(b"other annotator: not wanted")
    work = tmp_path / "work"
    (work / "configs/anonymizers").mkdir(parents=True)
    (work / "configs/anonymizers/mini.yaml").write_text(MINI)
    dest = tmp_path / "weights"
    server, url = serve(mirror)
    try:
        env = {"HF_ENDPOINT": url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        r = cli("mini", "--fetch", str(dest), cwd=work, env=env)
    finally:
        server.shutdown()
    # the mirror's Annotators repo lacks table5_pidinet.pth: named, exit status 1, everything else fetched
    assert r.returncode == 1 and "failed lllyasviel/Annotators: no table5_pidinet.pth in the repo" in r.stdout, r.stdout + r.stderr
    assert f"export ANONRISK_WEIGHTS={dest}" in r.stdout and "fetched tinyorg/tiny-sd" in r.stdout
    assert (dest / "tinyorg/tiny-sd/unet/diffusion_pytorch_model.safetensors").is_file()
    assert (dest / "tinyorg/tiny-sd/tokenizer").is_dir() and (dest / "tinyorg/tiny-sd/model_index.json").is_file()
    assert not (dest / "tinyorg/tiny-sd/v1-5-pruned.ckpt").exists() and not (dest / "tinyorg/tiny-canny/diffusion_pytorch_model.bin").exists()
    assert (dest / "annotators/ControlNetHED.pth").read_bytes() == b"hed" and not (dest / "annotators/sk_model.pth").exists()
    monkeypatch.chdir(work)  # the presets of the working directory, as the CLI reads them
    listed = weights.table(weights.needs("mini", str(dest)))
    assert listed.endswith("4 needed, 1 missing") and "\nno   " in listed, listed
    # the presets' hub ids and weights/ paths resolve under ANONRISK_WEIGHTS: the fetched model runs
    from anonrisk.anonymize import build_anonymizer
    from anonrisk.config.loader import resolve_anonymizer

    monkeypatch.setenv("ANONRISK_WEIGHTS", str(dest))
    a = build_anonymizer(resolve_anonymizer("mini", [work / "configs/anonymizers"], 0))
    assert a.p.model == str(dest / "tinyorg/tiny-sd") and a.p.annotator_weights["hed"] == str(dest / "annotators/ControlNetHED.pth")
    a.setup("cpu")
    faces = np.random.default_rng(0).integers(0, 255, (1, 32, 32, 3), dtype=np.uint8)
    assert a(faces, [1]).shape == faces.shape


def test_localize_moves_weights_paths_and_fetched_hub_ids_under_the_root(tmp_path, monkeypatch):
    from anonrisk.weights import localize

    (tmp_path / "owner/fetched").mkdir(parents=True)
    params = {"model": "owner/fetched", "vae": "owner/not-fetched", "controlnets": ["weights/controlnets/a", "/abs/b"],
              "annotator_weights": {"hed": "weights/annotators/ControlNetHED.pth", "midas": "random"}, "steps": 4}
    out = localize(params, str(tmp_path))
    assert out == {"model": str(tmp_path / "owner/fetched"), "vae": "owner/not-fetched",
                   "controlnets": [str(tmp_path / "controlnets/a"), "/abs/b"],
                   "annotator_weights": {"hed": str(tmp_path / "annotators/ControlNetHED.pth"), "midas": "random"}, "steps": 4}
    monkeypatch.delenv("ANONRISK_WEIGHTS", raising=False)
    assert localize(params) == params  # unset: unchanged
    # the plan reads it too: a run's anonymizer sees the root's folders
    from anonrisk.config.schema import Spec
    from anonrisk.plan import _anonymizer

    monkeypatch.setenv("ANONRISK_WEIGHTS", str(tmp_path))
    a = _anonymizer(Spec(name="x", kind="diffusion", params={"model": "weights/models/sd"}), "anonymizers[0]")
    assert a.p.model == str(tmp_path / "models/sd")
