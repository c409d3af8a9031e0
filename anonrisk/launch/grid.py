"""Grid files: axes x fixed settings -> cells -> a stage graph deduplicated by fingerprint.

A grid file names a base run config, dotted settings every cell shares (``fixed``) and ``axes``. An axis
is either a list of values for one setting or a mapping ``label -> {dotted settings}`` (a named variant,
e.g. a dataset with its root, or an anonymizer with a conditioning scale). Short axis names:

    anonymizer -> anonymizers: [value]      backbone -> train.backbone
    dataset    -> data.dataset              seed     -> train.seed (the anonymization is shared)

Every cell is one full run config with one anonymizer, and its nodes are the directories of its plan
(``anonrisk.plan``): prepare, anonymize, one train node per trained attack (its own job: the long,
checkpointed one) and evaluate, which writes the cell's report card (every configured attack, leakage,
utility) into ``runs/cell/<fp>/``. Cells that share work share nodes (a dataset x anonymizer is anonymized
once; an encoder trained on originals only serves every anonymizer); a node whose directory is DONE is never
run again; a cell is named by its plan's fingerprints, so operational settings never make new cells.
Planning is pure: it validates every cell and builds the graph without touching data or a cluster.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import Field

from anonrisk.config.loader import REPO_CONFIGS, deep_merge, load_yaml, nest, preset_dirs, resolve_anonymizer, validate
from anonrisk.config.migrate import migrate
from anonrisk.config.schema import RunConfig
from anonrisk.config.validation import Strict, validate_model
from anonrisk.errors import ConfigError
from anonrisk.launch.profile import ClusterProfile, StageResources, load_profile

STAGES = ("prepare", "anonymize", "train", "evaluate")
ALIASES = {"anonymizer": "anonymizers", "backbone": "train.backbone", "dataset": "data.dataset", "seed": "train.seed"}
AxisValues = Union[list[Any], dict[str, dict[str, Any]]]


class GridSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # a folder under results_dir: never ".."
    base: Optional[str] = None  # run config, relative to the grid file
    profile: str = "local"  # configs/clusters/<profile>.yaml or a path
    fixed: dict[str, Any] = {}
    axes: dict[str, AxisValues] = {}
    resources: dict[str, dict[str, Any]] = {}  # per-stage overrides of the profile's resources


def _expand_env(value: Any) -> Any:
    if isinstance(value, str):
        return os.path.expandvars(value)
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    return value


def axis_choices(axis: str, values: AxisValues) -> list[tuple[str, dict[str, Any]]]:
    """(label, dotted settings) for each value of one axis."""
    if isinstance(values, dict):
        if not values:
            raise ConfigError(f"grid axes.{axis}: no values")
        return [(str(label), dict(settings or {})) for label, settings in values.items()]
    if not values:
        raise ConfigError(f"grid axes.{axis}: no values")
    key = ALIASES.get(axis, axis)
    out = []
    for v in values:
        if key == "anonymizers":
            label = v["name"] if isinstance(v, dict) and "name" in v else str(v)
            out.append((label, {key: [v]}))
        else:
            out.append((str(v), {key: v}))
    return out


@dataclass
class Cell:
    id: str  # "anonymizer=blur,backbone=resnet50"
    axes: dict[str, str]
    config: RunConfig
    plan: Any  # its RunPlan (one target)

    @property
    def spec(self):
        return self.config.anonymizers[0]

    @property
    def target(self):
        return self.plan.target(self.spec)


@dataclass
class Node:
    stage: str
    key: str  # the stage directory relative to runs_dir: unique per unit of work
    cell: str  # a cell whose config runs this node (the first one that needs it)
    deps: list[str] = field(default_factory=list)
    cells: list[str] = field(default_factory=list)  # every cell that needs it
    attack: Optional[str] = None  # a train node: the attack (its name in ``cell``) whose encoder it trains


@dataclass
class GridPlan:
    spec: GridSpec
    path: Path
    profile: ClusterProfile
    resources: dict[str, StageResources]
    cells: list[Cell]
    nodes: dict[str, Node]  # by key, in stage order
    cell_nodes: dict[str, dict[str, str]]  # cell id -> role ("prepare", "anonymize", "train:<attack>", "evaluate") -> node key

    @property
    def runs_dir(self) -> Path:
        return Path(self.cells[0].config.runs_dir)

    @property
    def results_dir(self) -> Path:
        return Path(self.cells[0].config.results_dir) / self.spec.name

    @property
    def grid_dir(self) -> Path:
        """Submitter state (job ids, MLflow run ids) and submitit's job folders."""
        return self.runs_dir / "grids" / self.spec.name

    def cell(self, cell_id: str) -> Cell:
        return next(c for c in self.cells if c.id == cell_id)

    def stage_nodes(self, stage: str) -> list[Node]:
        return [n for n in self.nodes.values() if n.stage == stage]

    def is_done(self, node: Node) -> bool:
        return (self.runs_dir / node.key / "DONE").exists()


def find_grid_file(path: str) -> Path:
    p = Path(path)
    if p.exists():
        return p
    named = REPO_CONFIGS / "grids" / f"{path}.yaml"
    if named.exists():
        return named
    raise ConfigError(f"grid file not found: {path}")


def load_grid(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> tuple[GridSpec, Path]:
    p = find_grid_file(str(path))
    spec = validate_model(GridSpec, load_yaml(p), f"invalid grid file {p}")
    if overrides:
        spec.fixed = {**spec.fixed, **overrides}
    if "anonymizer" in spec.axes and "anonymizers" in spec.fixed:
        raise ConfigError(f"{p}: fixed.anonymizers conflicts with the anonymizer axis")
    return spec, p


def _check_cell(cell_plan, where: str) -> None:
    """What pydantic cannot see: the backbones must exist in timm, a real dataset's root must be there."""
    import timm

    cfg = cell_plan.cfg
    for a in next(iter(cell_plan.targets.values())).trained():
        backbone = a.train_config.backbone
        key = "train.backbone" if a.train_config.backbone == cfg.train.backbone else f"{a.key}.params.backbone"
        if not timm.is_model(backbone):
            close = timm.list_models(f"*{backbone.split('.')[0][:6]}*")[:8]
            raise ConfigError(f"{where}: {key} {backbone!r} is not a timm model" + (f"; similar: {', '.join(close)}" if close else ""))
    if cell_plan.dataset.needs_root:
        if not cfg.data.root:
            raise ConfigError(f"{where}: data.root is required for data.dataset={cfg.data.dataset}")
        if not Path(cfg.data.root).expanduser().is_dir():
            raise ConfigError(f"{where}: data.root {cfg.data.root!r} is not a directory (dataset {cfg.data.dataset})")


def plan_grid(path: str | os.PathLike, overrides: dict[str, Any] | None = None, check: bool = True) -> GridPlan:
    """Expand and validate the whole grid. Raises ConfigError naming the cell and key; queues nothing."""
    from anonrisk.data.content import cached

    with cached():  # a dataset's files are listed once for all the cells that read it
        return _plan_grid(path, overrides, check)


def _plan_grid(path: str | os.PathLike, overrides: dict[str, Any] | None, check: bool) -> GridPlan:
    from anonrisk.plan import plan

    spec, gpath = load_grid(path, overrides)
    base_path = (gpath.parent / spec.base).resolve() if spec.base else None
    base = migrate(load_yaml(base_path), str(base_path)) if base_path else {}
    profile = load_profile(spec.profile, gpath)
    resources = profile.resources_for(spec.resources, f"{gpath}: resources")
    dirs = preset_dirs(base_path) if base_path else preset_dirs(gpath)

    fixed = migrate(nest(_expand_env(spec.fixed), f"{gpath}: fixed"), f"{gpath}: fixed")
    axes = [[(name, label, settings) for label, settings in axis_choices(name, values)] for name, values in spec.axes.items()]
    cells: list[Cell] = []
    for combo in itertools.product(*axes) if axes else [()]:
        cell_id = ",".join(f"{name}={label}" for name, label, _ in combo) or "all"
        raw = deep_merge(base, fixed)
        for _, _, settings in combo:
            raw = deep_merge(raw, migrate(nest(_expand_env(settings), f"{gpath}: axes"), f"{gpath}: axes"))
        raw["name"] = f"{spec.name}"
        where = f"{gpath}: cell {cell_id}"
        cfg = validate(raw, where)
        # jobs may start in another directory than the submitter: pin the shared folders
        cfg.runs_dir, cfg.results_dir = str(Path(cfg.runs_dir).resolve()), str(Path(cfg.results_dir).resolve())
        if len(cfg.anonymizers) != 1:
            raise ConfigError(f"{where}: each cell needs exactly one anonymizer (use an 'anonymizer' axis); got {len(cfg.anonymizers)}")
        try:
            cfg.anonymizers = [resolve_anonymizer(cfg.anonymizers[0], dirs, 0)]
            cell_plan = plan(cfg)
            if check:
                next(iter(cell_plan.targets.values())).anonymizer.validate()
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if check:
            _check_cell(cell_plan, where)
        cells.append(Cell(cell_id, {name: label for name, label, _ in combo}, cfg, cell_plan))
    if len({c.config.runs_dir for c in cells}) > 1:
        raise ConfigError(f"{gpath}: runs_dir must be the same for every cell (it holds the shared stages)")

    nodes: dict[str, Node] = {}
    cell_nodes: dict[str, dict[str, str]] = {}
    for c in cells:
        runs = Path(c.config.runs_dir)
        t = c.target

        def node(stage: str, d, deps: list[str], attack: Optional[str] = None) -> str:
            key = str(Path(d.path).relative_to(runs))
            n = nodes.setdefault(key, Node(stage, key, c.id, deps, attack=attack))
            n.cells.append(c.id)
            return key

        keys = {"prepare": node("prepare", t.data, [])}
        keys["anonymize"] = node("anonymize", t.anonymize, [keys["prepare"]])
        for a in t.trained():  # the heavy, checkpointed trainings: a job each
            keys[f"train:{a.name}"] = node("train", a.train, [keys["prepare" if a.attack.source == "originals" else "anonymize"]], a.name)
        trains = [k for role, k in keys.items() if role.startswith("train:")]
        covered = any(nodes[k].deps == [keys["anonymize"]] for k in trains)  # the anonymization is upstream of a train node
        keys["evaluate"] = node("evaluate", t.cell, trains + ([] if covered else [keys["anonymize"]]))
        cell_nodes[c.id] = keys
    ordered = {n.key: n for stage in STAGES for n in nodes.values() if n.stage == stage}
    return GridPlan(spec, gpath.resolve(), profile, resources, cells, ordered, cell_nodes)
