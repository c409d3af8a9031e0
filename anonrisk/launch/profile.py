"""Cluster profiles (``configs/clusters/*.yaml``): what each stage asks the scheduler for, and the limits a
grid may not exceed. A grid's ``resources`` section overrides a stage's request; a request beyond the
profile's limits is refused at submit time, before anything is queued."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import Field

from anonrisk.config.loader import REPO_CONFIGS, load_yaml
from anonrisk.config.validation import Strict, validate_model
from anonrisk.errors import ConfigError

GRID_STAGES = ("prepare", "anonymize", "train", "evaluate", "collect")


class StageResources(Strict):
    gpus: int = Field(0, ge=0)  # per node
    cpus: int = Field(1, ge=1)  # per task
    mem_gb: Optional[float] = Field(None, gt=0)
    time_min: int = Field(60, ge=1)
    partition: Optional[str] = None  # default: the profile's
    nodes: int = Field(1, ge=1)
    tasks_per_node: int = Field(1, ge=1)  # > 1 for multi-GPU training (one task per GPU)


class ClusterProfile(Strict):
    name: str = "local"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    max_gpus_per_node: int = Field(0, ge=0)
    max_nodes: int = Field(1, ge=1)
    max_array_size: Union[int, Literal["auto"]] = "auto"  # "auto": ask scontrol for MaxArraySize
    array_parallelism: int = Field(64, ge=1)
    signal_delay_s: int = Field(120, ge=0)  # USR2 this long before the time limit: checkpoint, requeue
    max_requeues: int = Field(3, ge=0)  # time-outs after which a stage job gives up
    setup: list[str] = []  # shell lines run at the start of every job (module load, conda activate)
    stages: dict[str, StageResources] = {s: StageResources() for s in GRID_STAGES}

    def resources_for(self, overrides: dict[str, dict[str, Any]], where: str) -> dict[str, StageResources]:
        unknown = sorted(set(overrides) - set(GRID_STAGES))
        if unknown:
            raise ConfigError(f"{where}: unknown stage(s) {', '.join(unknown)}; stages: {', '.join(GRID_STAGES)}")
        out = {}
        for stage in GRID_STAGES:
            base = self.stages.get(stage, StageResources()).model_dump()
            res = validate_model(StageResources, {**base, **overrides.get(stage, {})}, f"{where}.{stage}")
            if res.gpus > self.max_gpus_per_node:
                raise ConfigError(
                    f"{where}.{stage}.gpus={res.gpus} exceeds what cluster profile '{self.name}' allows "
                    f"(max_gpus_per_node={self.max_gpus_per_node}); nothing was submitted"
                )
            if res.nodes > self.max_nodes:
                raise ConfigError(f"{where}.{stage}.nodes={res.nodes} exceeds profile '{self.name}' max_nodes={self.max_nodes}")
            out[stage] = res
        return out


def load_profile(name: str, grid_path: Optional[Path] = None) -> ClusterProfile:
    candidates = [Path(name)]
    if grid_path is not None:
        candidates.append(grid_path.parent / name)
        candidates.append(grid_path.parent.parent / "clusters" / f"{name}.yaml")
    candidates.append(REPO_CONFIGS / "clusters" / f"{name}.yaml")
    for p in candidates:
        if p.is_file():
            raw = load_yaml(p)
            raw.setdefault("name", p.stem)
            return validate_model(ClusterProfile, raw, f"invalid cluster profile {p}")
    known = sorted(p.stem for p in (REPO_CONFIGS / "clusters").glob("*.yaml"))
    raise ConfigError(f"cluster profile {name!r} not found; known profiles: {', '.join(known)}")


def slurm_max_array_size(profile: ClusterProfile) -> int:
    """The largest array a submission may hold: the profile's, or the cluster's MaxArraySize."""
    if profile.max_array_size != "auto":
        return int(profile.max_array_size)
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
        m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
        if m:
            return int(m.group(1))
    return 1001  # Slurm's default
