"""Relative output paths inside a Ray job (``ray job submit``): refused, since they would not land where the
user meant.

A job's driver runs in a directory Ray chooses: with ``--working-dir`` an unpacked copy under the head's
session temp folder, which Ray deletes; without it, the directory the head was started in. A relative
``runs_dir`` there loses the stage outputs (a later ``anonrisk train`` cannot see them), so it is an error
that says how to fix it. Ray's job supervisor marks the driver with the environment variable read below.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from anonrisk.errors import ConfigError

JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor in every `ray job submit` driver


def ray_job_working_dir() -> str | None:
    """``"--working-dir <uri>"`` or ``"no --working-dir"`` when this process is a Ray job's driver, else None."""
    raw = os.environ.get(JOB_ENV)
    if not raw:
        return None
    try:
        env = (json.loads(raw).get("runtime_env") or {})
    except (ValueError, AttributeError):
        env = {}
    wd = env.get("working_dir")
    return f"--working-dir {wd}" if wd else "no --working-dir"


def check_job_paths(paths: dict[str, str | None]) -> None:
    """Refuse a relative path among ``paths`` (config key -> value) when this process is a Ray job's driver."""
    job = ray_job_working_dir()
    if job is None:
        return
    for key, value in paths.items():
        if value and "://" not in value and not Path(value).is_absolute():
            raise ConfigError(
                f"{key}: {value!r} is relative, and this runs as a Ray job ({job}) in {os.getcwd()}, a directory Ray chooses "
                f"(and deletes, with --working-dir): outputs would be lost; give an absolute path on storage the head and "
                f"workers share, e.g. `-- anonrisk ... {key}=$PWD/{value}` on the submitting machine"
            )
