"""The shape of the package, read from its source with ``ast`` (docs/architecture.md): layers import only
downward (a short allow-list with reasons), no import circle (imports inside functions count; those under
``if TYPE_CHECKING:`` do not), no file over 400 lines, and one module that builds stage directories."""

from __future__ import annotations

import ast
from fnmatch import fnmatch
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "anonrisk"
MAX_LINES = 400

# bottom to top: a module may import its own layer and the layers below it
LAYERS = {
    "core": ["anonrisk", "anonrisk.errors", "anonrisk.stages", "anonrisk.registry", "anonrisk.weights", "anonrisk.devices", "anonrisk.environment",
             "anonrisk.config", "anonrisk.config.*"],
    "library": ["anonrisk.data.records", "anonrisk.data.io", "anonrisk.data.synthetic", "anonrisk.data.align",
                "anonrisk.attack.losses", "anonrisk.attack.model", "anonrisk.attack.gradcache", "anonrisk.attack.dist",
                "anonrisk.attack.data", "anonrisk.attack.train_plan", "anonrisk.attack.engine_base", "anonrisk.attack.torch_engine",
                "anonrisk.attack.deepspeed_engine", "anonrisk.attack.engine", "anonrisk.attack.train", "anonrisk.attack.embed",
                "anonrisk.attack.tiled", "anonrisk.attack.optim",
                "anonrisk.evaluate", "anonrisk.evaluate.metrics", "anonrisk.evaluate.protocols", "anonrisk.evaluate.leakage",
                "anonrisk.evaluate.utility", "anonrisk.evaluate.face_nets", "anonrisk.evaluate.recognizers",
                "anonrisk.evaluate.fid_inception", "anonrisk.evaluate.protocols_reference", "anonrisk.evaluate.audit",
                "anonrisk.evaluate.anonymity", "anonrisk.evaluate.verification", "anonrisk.evaluate.privacy",
                "anonrisk.anonymize.tiny", "anonrisk.anonymize.annotators", "anonrisk.anonymize.conditions",
                "anonrisk.anonymize.conditioning", "anonrisk.anonymize.diffusion_params", "anonrisk.anonymize.diffusion_components",
                "anonrisk.anonymize.masks", "anonrisk.anonymize.sampler", "anonrisk.anonymize.external",
                "anonrisk.anonymize.schedulers", "anonrisk.anonymize.light_attributes",
                "anonrisk.report", "anonrisk.report.card", "anonrisk.report.plots"],
    "plugins": ["anonrisk.anonymize", "anonrisk.anonymize.base", "anonrisk.anonymize.classical", "anonrisk.anonymize.diffusion",
                "anonrisk.anonymize.precomputed", "anonrisk.anonymize.command",
                "anonrisk.anonymize.camouflage", "anonrisk.anonymize.camouflage_light", "anonrisk.anonymize.instance_aug_faithful", "anonrisk.attack", "anonrisk.attack.base", "anonrisk.attack.trained",
                "anonrisk.attack.edge", "anonrisk.attack.recognizer", "anonrisk.data", "anonrisk.data.datasets",
                "anonrisk.data.hf", "anonrisk.data.unlabeled", "anonrisk.data.wild"],
    "stages": ["anonrisk.anonymize.runner", "anonrisk.anonymize.ray_runner", "anonrisk.anonymize.ray_connect", "anonrisk.data.prepare",
               "anonrisk.evaluate.evaluate", "anonrisk.report.report", "anonrisk.tracking", "anonrisk.tracking.*"],
    "plan": ["anonrisk.plan", "anonrisk.pipeline"],
    "launch": ["anonrisk.cli", "anonrisk.__main__", "anonrisk.launch", "anonrisk.launch.*"],
}
ORDER = list(LAYERS)
# (importer, imported) pairs that may go upward, each with its reason; at most two
UPWARD_ALLOWED: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def layer_of(module: str) -> str:
    found = [layer for layer, patterns in LAYERS.items() if any(fnmatch(module, p) for p in patterns) and
             not (module == "anonrisk" and layer != "core")]
    exact = [layer for layer, patterns in LAYERS.items() if module in patterns]
    return (exact or found or ["?"])[0]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path) -> set[str]:
    """The anonrisk modules a file imports anywhere (module level or inside functions)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.split(".")[0] == "anonrisk")
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "anonrisk" and child.level == 0:
                for a in child.names:  # ``from pkg import submodule`` imports the submodule
                    sub = f"{child.module}.{a.name}"
                    found.add(sub if sub in MODULES else child.module)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in MODULES}


GRAPH = {m: imports_of(p) - {m} for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    assert [m for m in MODULES if layer_of(m) == "?"] == []


def test_layers_import_only_downward():
    upward = []
    for m, deps in GRAPH.items():
        for d in sorted(deps):
            if ORDER.index(layer_of(d)) > ORDER.index(layer_of(m)) and (m, d) not in UPWARD_ALLOWED:
                upward.append(f"{m} ({layer_of(m)}) imports {d} ({layer_of(d)})")
    assert upward == []
    assert len(UPWARD_ALLOWED) <= 2


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one module (the import circles)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            connect(v)
    return out


def test_no_import_circle():
    assert strongly_connected(GRAPH) == []


def test_the_circle_finder_finds_circles():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_file_over_400_lines(module):
    assert len(MODULES[module].read_text().splitlines()) <= MAX_LINES


def test_only_the_plan_builds_stage_directories():
    builders = []
    for m, p in MODULES.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "StageDir":
                builders.append(m)
    assert set(builders) == {"anonrisk.plan"}
