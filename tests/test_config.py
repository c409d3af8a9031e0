import subprocess
import sys

import pytest

from anonrisk.config import load_config, parse_overrides
from anonrisk.errors import ConfigError


def test_overrides_are_parsed_as_yaml_into_nested_keys():
    assert parse_overrides(["attack.steps=10", "anonymizers=[identity,blur]", "evaluate.pool_size=all"]) == {
        "attack": {"steps": 10}, "anonymizers": ["identity", "blur"], "evaluate": {"pool_size": "all"}}


def test_overrides_win_over_the_file_and_presets_resolve(tmp_path):
    cfg = load_config("configs/quickstart.yaml", ["attack.backbone=resnet10t", "anonymizers=[identity,{name: b2, kind: blur, params: {sigma: 0.1}}]"])
    assert cfg.attack.backbone == "resnet10t"
    assert [(s.name, s.kind, s.params) for s in cfg.anonymizers] == [("identity", "identity", {}), ("b2", "blur", {"sigma": 0.1})]


def test_unknown_key_names_it_and_the_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config("configs/quickstart.yaml", ["attack.backbne=resnet18"])
    msg = str(e.value)
    assert "attack.backbne" in msg and "backbone" in msg and "temperature" in msg


def test_unknown_key_inside_an_anonymizer_spec_lists_the_spec_keys():
    with pytest.raises(ConfigError, match=r"anonymizers\.0\.parms.*name, kind, params"):
        load_config(None, ["anonymizers=[{name: b, kind: blur, parms: {}}]"])


def test_out_of_range_and_bad_choice_name_the_key():
    with pytest.raises(ConfigError, match=r"attack.temperature"):
        load_config(None, ["attack.temperature=-1"])
    with pytest.raises(ConfigError, match=r"data.dataset.*'imagenet'.*synthetic"):
        load_config(None, ["data.dataset=imagenet"])


def test_unknown_anonymizer_lists_kinds_and_presets():
    with pytest.raises(ConfigError, match=r"anonymizers\[1\].*'blurr'.*blur.*pixelate"):
        load_config("configs/quickstart.yaml", ["anonymizers=[identity,blurr]"])


def test_cli_reports_config_errors_cleanly_with_nonzero_exit():
    r = subprocess.run([sys.executable, "-m", "anonrisk", "validate", "configs/quickstart.yaml", "attack.nope=1"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "anonrisk: error:" in r.stderr and "attack.nope" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_missing_config_file():
    r = subprocess.run([sys.executable, "-m", "anonrisk", "validate", "configs/nope.yaml"], capture_output=True, text=True)
    assert r.returncode == 2 and "config file not found: configs/nope.yaml" in r.stderr


def test_default_attacks_are_specs_too():
    # a config without an `attacks` list gets the default, validated like a given one
    from anonrisk.config import load_config
    from anonrisk.config.schema import AttackSpec

    assert load_config(None).attacks == [AttackSpec(name="contrastive", kind="contrastive")]
