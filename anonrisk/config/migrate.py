"""Old config names, still read: each is rewritten to its new name with a one-line deprecation warning
(once per source and name), so existing configs, overrides and grid files keep working.

- ``attack:`` (the trainer's settings) is ``train:``, beside ``attacks:`` (the threat models);
- ``seed:`` at the top and ``train.extra`` were read nowhere: dropped.
- ``anonymize.ray.max_restarts`` and ``max_task_retries``: Ray Data's actor pool restarts and retries by itself.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("anonrisk")
_warned: set[tuple[str, str]] = set()

RENAMED = {"attack": "train"}
DROPPED = {
    "seed": "it was read nowhere; the seeds are data.split.seed, anonymize.seed, train.seed and evaluate.seed",
    "train.extra": "it was read nowhere",
    "anonymize.ray.max_restarts": "Ray Data restarts a dead actor and reruns its shards by itself",
    "anonymize.ray.max_task_retries": "Ray Data restarts a dead actor and reruns its shards by itself",
}


def _warn(source: str, old: str, text: str) -> None:
    if (source, old) not in _warned:
        _warned.add((source, old))
        log.warning("%s: '%s' is deprecated: %s", source, old, text)


def migrate(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """A copy of one source's nested settings with the new names (an explicit new name wins over an old one
    in the same source)."""
    out = dict(raw)
    for old, new in RENAMED.items():
        if old in out:
            value = out.pop(old)
            _warn(source, old, f"use '{new}:' (same keys){'; the new name wins where both are given' if new in out else ''}")
            if new not in out:
                out[new] = value
            elif isinstance(value, dict) and isinstance(out[new], dict):
                out[new] = {**value, **out[new]}
    for dotted, why in DROPPED.items():
        *parents, last = dotted.split(".")
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            node = _copy_path(out, parents)
            node.pop(last)
            _warn(source, dotted, f"dropped ({why})")
    return out


def _copy_path(out: dict, parents: list[str]) -> dict:
    """The dict at ``parents`` inside ``out``, copied on the way so the caller's input stays untouched."""
    node = out
    for p in parents:
        node[p] = dict(node[p])
        node = node[p]
    return node
