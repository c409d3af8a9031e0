"""``anonrisk validate``: what ``run`` would hit, found without doing the work.

Beyond the config's own checks (pydantic, each kind's Params, the plan): every trained attack's backbone must
be in timm's registry, a real dataset's root must exist, and each attack's ``validate`` (a surrogate needs
aux identities; a batch needs that many distinct training identities) runs against the records prepare
would make, counted from the dataset's file listing (no image decoded, no stage written).
"""

from __future__ import annotations


def preflight(pipe) -> dict[str, str]:
    """Raise ConfigError/DataError for what would fail later; returns the attacks that would be skipped
    ({name: reason}, e.g. missing optional weights)."""
    from anonrisk.data.prepare import preview_records
    from anonrisk.launch.grid import _check_cell

    pipe.validate()
    _check_cell(pipe.plan, "validate")
    pipe.__dict__["records"] = preview_records(pipe.cfg.data, pipe.plan.dataset, pipe.plan.prepare)  # the cached_property
    try:
        return pipe.validate_attacks()
    finally:
        del pipe.__dict__["records"]
