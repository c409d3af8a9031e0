"""Registries: kinds from other packages through entry points (a broken one reported with its package,
never breaking the others), and each kind's Params validated into one ConfigError per bad key."""

import sys

import pytest
from pydantic import Field

from anonrisk.config.validation import Strict
from anonrisk.errors import ConfigError
from anonrisk.registry import Registry


@pytest.fixture
def plugin_packages(tmp_path, monkeypatch):
    """Two installed distributions (real dist-info folders on sys.path): one good kind, one that fails to import."""
    (tmp_path / "good_kinds.py").write_text(
        "from anonrisk.anonymize.base import Anonymizer\n"
        "from anonrisk.config.validation import Strict\n"
        "class Shift(Anonymizer):\n"
        "    class Params(Strict):\n"
        "        by: int = 1\n"
        "    def __call__(self, images, seeds):\n"
        "        return images + self.p.by\n")
    for dist, value in (("good-kinds", "good_kinds:Shift"), ("broken-kinds", "no_such_module_here:Thing")):
        info = tmp_path / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[anonrisk.test_kinds]\n{dist.split('-')[0]} = {value}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("good_kinds", None)


def test_entry_point_kinds_load_and_a_broken_one_names_its_package(plugin_packages):
    reg = Registry("anonymizer", group="anonrisk.test_kinds")

    @reg.register("builtin")
    class Builtin:
        pass

    assert reg.names() == ["builtin", "good"]  # the broken one never hides the others
    shift = reg.build("good", "anonymizers[0] (s)", by=3)
    assert shift.p.by == 3 and shift.key == "anonymizers[0] (s)"
    with pytest.raises(ConfigError, match=r"anonymizers\[1\] \(x\): anonymizer 'broken': package broken-kinds "
                                          r"\(no_such_module_here:Thing\) failed to load: ModuleNotFoundError"):
        reg.get("broken", "anonymizers[1] (x)")
    with pytest.raises(ConfigError, match=r"k: unknown anonymizer 'nope'; known: builtin, good"):
        reg.get("nope", "k")


def test_params_errors_name_every_bad_key():
    reg = Registry("thing")

    @reg.register("t")
    class Thing:
        class Params(Strict):
            size: int = Field(1, ge=1)
            mode: str = "a"

        def __init__(self, p, key):
            self.p = p

    with pytest.raises(ConfigError) as err:
        reg.build("t", "things[0]", size=0, colour="red")
    msg = str(err.value)
    assert msg.startswith("things[0]: thing 't':\n")
    assert "params.size: Input should be greater than or equal to 1 (got 0)" in msg
    assert "params.colour: unknown key; valid keys here: size, mode" in msg


def test_kinds_list_their_package_and_params_and_failed_plugins(plugin_packages):
    """What `anonrisk ls kinds` prints: every kind with the distribution it comes from; a failed plugin with why."""
    reg = Registry("anonymizer", group="anonrisk.test_kinds")

    @reg.register("builtin")
    class Builtin:
        pass

    kinds = {k.name: k for k in reg.kinds()}
    assert sorted(kinds) == ["broken", "builtin", "good"]
    assert kinds["good"].package == "good-kinds" and kinds["good"].params.model_fields["by"].default == 1
    assert kinds["broken"].package == "broken-kinds" and kinds["broken"].entry is None
    assert "no_such_module_here" in kinds["broken"].error
