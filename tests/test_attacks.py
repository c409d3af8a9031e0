"""The attack suite end to end on a small synthetic dataset (90 identities x 6 images, 64 px; a third are
targets, a third the black-box attacker's own aux identities): known answers per threat model, the report
card and leaderboard, and skipped columns that never abort the report."""

import json
from pathlib import Path

import pytest

from anonrisk.config import load_config
from anonrisk.errors import ConfigError
from anonrisk.pipeline import Pipeline
from anonrisk.plan import plan

MAIN = "full-ref/exclude-source"
ATTACKS = (
    "[edge, {name: surrogate, kind: surrogate, params: {input: rgb+edges}}, edge-encoder, "
    "{name: arcface, kind: recognizer, params: {model: arcface}}, "
    "{name: facenet, kind: recognizer, params: {model: facenet, weights: /nonexistent/facenet.safetensors}}]"
)


def small_cfg(tmp, *overrides):
    return load_config("configs/quickstart.yaml", [
        f"runs_dir={tmp}/runs", f"results_dir={tmp}/results", "progress=false", "tracking.mlflow=false", "name=suite",
        "data.synthetic.identities=90", "data.synthetic.images_per_identity=6",
        "data.split.test_fraction=0.34", "data.split.aux_fraction=0.33",
        "anonymizers=[identity,noise,blur,resynth]", f"attacks={ATTACKS}",
        "train.batch_size=32", "train.steps=60", "evaluate.bootstrap=200", "evaluate.few_ref_k=3", *overrides])


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("suite")
    return tmp, Pipeline(small_cfg(tmp)).run()


def top1(doc, anonymizer, attack, key=MAIN):
    return doc["results"][anonymizer]["attacks"][attack]["protocols"][key]["top1"]


def beats_chance(m):
    """The bootstrap interval's lower end is above what a chance-level attacker scores 97.5 % of the time."""
    return m["ci95"][0] > m["chance_ci95"][1]


def at_chance(m):
    return m["value"] <= m["chance_ci95"][1] and m["ci95"][0] <= m["chance"]


@pytest.mark.slow
def test_edge_matcher_beats_chance_on_structure_preserving_and_not_on_noise(suite):
    _, doc = suite
    for name in ("identity", "resynth", "blur"):
        assert beats_chance(top1(doc, name, "edge")), (name, top1(doc, name, "edge"))
    assert at_chance(top1(doc, "noise", "edge")), top1(doc, "noise", "edge")
    # keeping the edges is the leak: resynth redraws every colour yet the matcher finds it, in linkage almost always
    assert top1(doc, "resynth", "edge", "full-ref/linkage")["value"] > 0.9


@pytest.mark.slow
def test_edge_encoder_trained_on_originals_only(suite):
    tmp, doc = suite
    for name in ("identity", "resynth"):
        assert beats_chance(top1(doc, name, "edge-encoder")), (name, top1(doc, name, "edge-encoder"))
    assert at_chance(top1(doc, "noise", "edge-encoder")), top1(doc, "noise", "edge-encoder")
    # one encoder for every anonymizer: it never saw an anonymized image
    trains = {doc["results"][n]["attacks"]["edge-encoder"]["fingerprints"]["train"] for n in doc["results"]}
    assert len(trains) == 1
    cfg = json.loads(Path(tmp, "runs", "train", trains.pop(), "config.json").read_text())
    assert cfg["train"]["input"] == "edges"


@pytest.mark.slow
def test_surrogate_trained_on_its_own_aux_identities_beats_chance(suite):
    _, doc = suite
    for name in ("identity", "resynth", "blur"):
        assert beats_chance(top1(doc, name, "surrogate")), (name, top1(doc, name, "surrogate"))
    assert at_chance(top1(doc, "noise", "surrogate")), top1(doc, "noise", "surrogate")
    trains = {doc["results"][n]["attacks"]["surrogate"]["fingerprints"]["train"] for n in doc["results"]}
    assert len(trains) == 4  # one per target anonymizer: the attacker queried each one


@pytest.mark.slow
def test_missing_recognizer_weights_skip_the_column_with_a_reason(suite):
    tmp, doc = suite
    card = doc["results"]["resynth"]
    assert "params.weights is not set" in card["attacks"]["arcface"]["skipped"]
    assert "/nonexistent/facenet.safetensors" in card["attacks"]["facenet"]["skipped"]
    out = Path(doc["results_dir"])
    report = (out / "report.md").read_text()
    assert report.count("skipped: ") >= 2 * 4 and "LPIPS skipped: " in report and "FID, KID skipped: " in report
    # ... and everything else is still there
    assert report.count("### ") == 4 and "Worst case" in report
    for f in ("metrics.json", "leaderboard.md", "leaderboard.json", "plots/reid.png", "plots/privacy_utility.png",
              "plots/leakage_vs_reid.png", "plots/card_resynth.png"):
        assert (out / f).stat().st_size > 200, f


@pytest.mark.slow
def test_report_card_and_leaderboard(suite):
    _, doc = suite
    out = Path(doc["results_dir"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["schema_version"] == 2 and set(saved["results"]["blur"]["attacks"]) == {"edge", "surrogate", "edge-encoder", "arcface", "facenet"}
    board = json.loads((out / "leaderboard.json").read_text())["rows"]
    names = [r["anonymizer"] for r in board]
    assert names[0] == "noise" and names[-1] == "identity", names  # most private first
    for r in board:  # the worst case over attacks is the maximum of the attacks that ran
        assert r["worst_top1"] == max(r["top1_by_attack"].values())
        assert set(r["skipped_attacks"]) == {"arcface", "facenet"}
    assert (out / "leaderboard.md").read_text().count("| resynth |") == 1
    util = doc["results"]["identity"]["utility"]
    assert util["ssim"] == 1.0 and util["psnr"] is None and util["identical_pairs"] == util["n_pairs"]
    assert set(util["skipped"]) == {"lpips", "fid", "kid"}
    assert doc["results"]["noise"]["utility"]["ssim"] < 0.05


def test_surrogate_without_aux_identities_is_a_config_error(tmp_path):
    cfg = small_cfg(tmp_path, "data.split.aux_fraction=0.0", "attacks=[surrogate]", "data.synthetic.identities=12",
                    "anonymizers=[identity]")
    pipe = Pipeline(cfg)
    pipe.prepare()
    with pytest.raises(ConfigError, match="aux_fraction"):
        pipe.validate_attacks()


def test_attack_config_errors_name_the_key(tmp_path):
    # kinds and params are checked when the plan is built, before any stage runs
    with pytest.raises(ConfigError, match=r"attacks\[0\].*unknown attack 'edges'.*edge-encoder"):
        plan(small_cfg(tmp_path, "attacks=[edges]"))
    with pytest.raises(ConfigError, match="repeated: edge"):
        small_cfg(tmp_path, "attacks=[edge, edge]")
    with pytest.raises(ConfigError, match=r"attacks\[0\] \(e\): attack 'edge': params.score: 'hamming' is not allowed; expected 'ncc' or 'chamfer'"):
        plan(small_cfg(tmp_path, "attacks=[{name: e, kind: edge, params: {score: hamming}}]"))
    with pytest.raises(ConfigError, match=r"attacks\[0\] \(s\): attack 'surrogate': params.stepz: unknown key; valid keys here: backbone"):
        plan(small_cfg(tmp_path, "attacks=[{name: s, kind: surrogate, params: {stepz: 3}}]"))
    with pytest.raises(ConfigError, match=r"attacks\[0\] \(e\): attack 'edge': params: score=chamfer needs binary edges"):
        plan(small_cfg(tmp_path, "attacks=[{name: e, kind: edge, params: {score: chamfer, edges: sobel}}]"))


TRAINED = "[{name: c, kind: contrastive, params: {steps: 5}}, surrogate, edge-encoder]"


def test_every_trained_attack_gets_the_training_plan_check(tmp_path):
    # fp16 on the CPU is refused for each trained attack, not only for the default one
    for kind in ("contrastive", "surrogate", "edge-encoder"):
        pipe = Pipeline(small_cfg(tmp_path, f"attacks=[{{name: a, kind: {kind}, params: {{precision: fp16}}}}]", "train.device=cpu"))
        with pytest.raises(ConfigError, match=r"train.precision=fp16 on the CPU"):
            pipe.validate()
    Pipeline(small_cfg(tmp_path, f"attacks={TRAINED}", "train.device=cpu")).validate()


def test_every_attack_that_reads_the_target_gets_the_multi_process_guard(tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path, f"attacks={TRAINED}", "data.synthetic.identities=12", "anonymizers=[identity]")
    pipe = Pipeline(cfg)
    pipe.prepare()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for name in ("c", "surrogate"):  # several ranks must not anonymize the target at once
        with pytest.raises(ConfigError, match=r"2 processes would anonymize 'identity' at once: run `anonrisk anonymize` first"):
            pipe.train("identity", name)
    assert not (tmp_path / "runs" / "anonymize").exists()
    # edge-encoder never reads the target; one encoder for every anonymizer
    t = pipe.target("identity")
    assert t.attacks["edge-encoder"].train_config.input == "edges" and t.attacks["c"].train_config.steps == 5


def test_edge_scores_known_answers():
    import numpy as np

    from anonrisk.attack.edge import chamfer_similarity, ncc_features

    a = np.zeros((1, 16, 16), np.float32)
    a[0, 4, 2:14] = 1  # a horizontal line
    b = np.roll(a, 3, axis=1)  # the same line 3 px lower
    c = a.transpose(0, 2, 1)  # a vertical line
    assert chamfer_similarity(a, a)[0, 0] == 0
    assert chamfer_similarity(a, b)[0, 0] == pytest.approx(-3.0)
    assert chamfer_similarity(a, c)[0, 0] < -3.0
    near = np.roll(a, 1, axis=1)  # NCC of smoothed maps tolerates shifts about as large as the smoothing
    f = ncc_features(np.concatenate([a, near, b, c]), smooth=1.0)
    sim = f @ f.T
    assert sim[0, 0] == pytest.approx(1.0, abs=1e-4) and sim[0, 1] > 0.5 > sim[0, 3] and sim[0, 2] < 0.5
