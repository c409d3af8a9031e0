"""MLflow's sqlite database is created (its schema migrated) by one process at a time.

Two processes opening a new ``mlflow.db`` at once both run MLflow's migrations and one fails
("table experiments already exists"); grid jobs and concurrent runs sharing a runs_dir do exactly that. The
first client of a sqlite store is therefore made under an ``flock`` beside the database (the lock's NFS
behaviour: ``anonrisk.stages.file_lock``); other stores (a server URI) are left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

_ready: set[str] = set()


def ready_client(uri: str):
    """An ``MlflowClient`` for ``uri``, the sqlite database created once under a lock."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    if not uri.startswith("sqlite:///") or uri in _ready:
        return MlflowClient(uri)
    from anonrisk.stages import file_lock

    db = Path(uri[len("sqlite:///"):])
    with file_lock(f"{db}.lock", f"MLflow store {db}"):
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # opens the store: creates and migrates the schema
    _ready.add(uri)
    return client
