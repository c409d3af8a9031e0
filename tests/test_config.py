import subprocess
import sys

import pytest

from anonrisk.config import load_config, parse_overrides
from anonrisk.errors import ConfigError
from anonrisk.plan import plan


def test_overrides_are_parsed_as_yaml_into_nested_keys():
    assert parse_overrides(["attack.steps=10", "anonymizers=[identity,blur]", "evaluate.pool_size=all"]) == {
        "attack": {"steps": 10}, "anonymizers": ["identity", "blur"], "evaluate": {"pool_size": "all"}}


def test_overrides_win_over_the_file_and_presets_resolve(tmp_path):
    cfg = load_config("configs/quickstart.yaml", ["train.backbone=resnet10t", "anonymizers=[identity,{name: b2, kind: blur, params: {sigma: 0.1}}]"])
    assert cfg.train.backbone == "resnet10t"
    assert [(s.name, s.kind, s.params) for s in cfg.anonymizers] == [("identity", "identity", {}), ("b2", "blur", {"sigma": 0.1})]


def test_unknown_key_names_it_and_the_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config("configs/quickstart.yaml", ["train.backbne=resnet18"])
    msg = str(e.value)
    assert "train.backbne" in msg and "backbone" in msg and "temperature" in msg


def test_unknown_key_inside_an_anonymizer_spec_lists_the_spec_keys():
    with pytest.raises(ConfigError, match=r"anonymizers\.0\.parms.*name, kind, params"):
        load_config(None, ["anonymizers=[{name: b, kind: blur, parms: {}}]"])


def test_out_of_range_and_bad_choice_name_the_key():
    with pytest.raises(ConfigError, match=r"train.temperature"):
        load_config(None, ["train.temperature=-1"])
    # kinds are checked when the plan is built (the config layer only parses)
    with pytest.raises(ConfigError, match=r"data.dataset.*'imagenet'.*synthetic"):
        plan(load_config(None, ["data.dataset=imagenet"]))


def test_unknown_anonymizer_lists_kinds_and_presets():
    with pytest.raises(ConfigError, match=r"anonymizers\[1\].*'blurr'.*blur.*pixelate.*presets: .*controlnet-canny"):
        plan(load_config("configs/quickstart.yaml", ["anonymizers=[identity,blurr]"]))


def test_cli_reports_config_errors_cleanly_with_nonzero_exit():
    r = subprocess.run([sys.executable, "-m", "anonrisk", "validate", "configs/quickstart.yaml", "train.nope=1"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "anonrisk: error:" in r.stderr and "train.nope" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_missing_config_file():
    r = subprocess.run([sys.executable, "-m", "anonrisk", "validate", "configs/nope.yaml"], capture_output=True, text=True)
    assert r.returncode == 2 and "config file not found: configs/nope.yaml" in r.stderr


def test_default_attacks_are_specs_too():
    # a config without an `attacks` list gets the default, validated like a given one
    from anonrisk.config import load_config
    from anonrisk.config.schema import Spec

    assert load_config(None).attacks == [Spec(name="contrastive", kind="contrastive")]


def test_bad_params_of_every_kind_are_one_config_error_naming_the_key():
    # blur sigma -1 once ended in a traceback (a ValueError from the constructor)
    cases = [
        (["anonymizers=[{name: b, kind: blur, params: {sigma: -1}}]"], r"anonymizers\[0\] \(b\): anonymizer 'blur': params.sigma: Input should be greater than 0"),
        (["anonymizers=[{name: p, kind: pixelate, params: {blocks: many}}]"], r"anonymizers\[0\] \(p\): anonymizer 'pixelate': params.blocks: Input should be a valid integer"),
        (["attacks=[{name: e, kind: edge, params: {sigma: 0}}]"], r"attacks\[0\] \(e\): attack 'edge': params.sigma: Input should be greater than 0"),
        (["attacks=[{name: c, kind: contrastive, params: {steps: 0}}]"], r"attacks\[0\] \(c\): params.steps: Input should be greater than or equal to 1"),
        (["attacks=[{name: r, kind: recognizer, params: {model: dlib, upsample: -2}}]"], r"attacks\[0\] \(r\): recognizer 'dlib': params.upsample: Input should be greater"),
        (["data.synthetic.identities=1"], r"data: dataset 'synthetic': data.synthetic.identities: Input should be greater than or equal to 2"),
        (["data.celeb={}"], r"data.celeb: unknown key; valid keys here: dataset, root, .*a dataset kind: celeba, folder, hf, lfw, synthetic, unlabeled, wild"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            plan(load_config(None, overrides))
    r = subprocess.run([sys.executable, "-m", "anonrisk", "validate", "configs/quickstart.yaml", "anonymizers=[{name: b, kind: blur, params: {sigma: -1}}]"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "params.sigma: Input should be greater than 0 (got -1)" in r.stderr and "Traceback" not in r.stderr


def test_old_names_keep_working_with_one_deprecation_line_each(tmp_path, caplog):
    old = tmp_path / "old.yaml"
    old.write_text("seed: 3\nattack: {steps: 12, backbone: resnet10t, extra: {}}\nattacks: [contrastive]\n")
    with caplog.at_level("WARNING", logger="anonrisk"):
        cfg = load_config(old, ["attack.lr=0.5"])
    assert (cfg.train.steps, cfg.train.backbone, cfg.train.lr) == (12, "resnet10t", 0.5)
    lines = [r.getMessage() for r in caplog.records]
    assert f"{old}: 'attack' is deprecated: use 'train:' (same keys)" in lines
    assert "override: 'attack' is deprecated: use 'train:' (same keys)" in lines
    assert any(line.startswith(f"{old}: 'seed' is deprecated: dropped") for line in lines)
    assert any(line.startswith(f"{old}: 'train.extra' is deprecated: dropped") for line in lines)
    assert all("\n" not in line for line in lines)
    # an old override beats the new name in the file, and a new override beats the old name in the file
    new = tmp_path / "new.yaml"
    new.write_text("train: {steps: 12}\n")
    assert load_config(new, ["attack.steps=7"]).train.steps == 7
    assert load_config(old, ["train.steps=9"]).train.steps == 9
