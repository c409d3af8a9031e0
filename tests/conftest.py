import os

# Offline and loopback-only everywhere, before any library reads these.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def dist_group():
    """One loopback gloo process group of one for the whole session: every in-process DeepSpeed engine
    shares it (DeepSpeed needs a group even alone; creating one per test would cost a rendezvous each)."""
    from anonrisk.attack.dist import init_process_group

    return init_process_group(always=True)
