"""Connecting the Ray runner to a cluster (or starting Ray in this process) and sizing its actor pool.
Ray is imported inside functions only."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from anonrisk.anonymize.base import Anonymizer
from anonrisk.config.schema import RayConfig
from anonrisk.errors import ConfigError

ADDRESS_KEY = "anonymize.ray.address"
GPU_KEY = "anonymize.ray.num_gpus_per_worker"
CPU_KEY = "anonymize.ray.num_cpus_per_worker"
DEFAULT_PORTS = {"ray": 10001, "": 6379}

def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("anonymize.runner=ray needs Ray: pip install 'anonrisk[ray]' (or use anonymize.runner=local)") from None
    return ray


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of ``host:port`` (a GCS address) or ``ray://host[:port]`` (Ray Client)."""
    if address.startswith(("http://", "https://")):
        raise ConfigError(
            f"{ADDRESS_KEY}: {address!r} is a dashboard (job API) address, which a driver cannot connect to; "
            f"submit the stage as a job instead: `ray job submit --address {address} -- anonrisk anonymize CONFIG "
            f"anonymize.runner=ray {ADDRESS_KEY}=auto`, or give the GCS address (host:6379) or ray://host:10001"
        )
    scheme = "ray" if address.startswith("ray://") else ""
    if "://" in address and not scheme:
        raise ConfigError(f"{ADDRESS_KEY}: unknown scheme in {address!r}; expected auto, host:port or ray://host:port")
    parsed = urlparse(address if scheme else f"//{address}")
    try:
        host, port = parsed.hostname, parsed.port or DEFAULT_PORTS[scheme]
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise ConfigError(f"{ADDRESS_KEY}: cannot read a host and port from {address!r}; expected auto, host:port or ray://host:port")
    return host, port


def check_reachable(address: str, timeout: float) -> None:
    """Fail fast (``timeout`` seconds) on an address nobody listens on, before Ray's own long retries."""
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        reason = "timed out" if isinstance(exc, (socket.timeout, TimeoutError)) else (exc.strerror or type(exc).__name__)
        raise ConfigError(
            f"{ADDRESS_KEY}: no Ray cluster reachable at {address} ({host}:{port}: {reason} after at most {timeout:g} s); "
            f"start one (`ray start --head`), fix the address, or leave {ADDRESS_KEY} unset to start Ray in this process"
        ) from None


def resolve_auto_address() -> str:
    """The cluster ``address=auto`` means: RAY_ADDRESS (set by `ray job submit`) or the node's latest `ray start`."""
    env = os.environ.get("RAY_ADDRESS")
    if env and env != "auto":
        return env
    from ray._private.services import canonicalize_bootstrap_address

    try:
        found = canonicalize_bootstrap_address("auto")
    except (ConnectionError, ValueError) as exc:
        found, why = None, str(exc).splitlines()[0]
    else:
        why = "no running cluster recorded on this node"
    if not found:
        raise ConfigError(
            f"{ADDRESS_KEY}=auto: no Ray cluster found on this node ({why}); start one with `ray start --head`, "
            f"set RAY_ADDRESS, or leave {ADDRESS_KEY} unset to start Ray in this process"
        )
    return found


def connect(rc: RayConfig):
    """Connect to (or start) Ray; returns (ray, where, started_here)."""
    ray = import_ray()
    if ray.is_initialized():  # a caller (a test, a notebook, a job) already connected: use that cluster
        return ray, "the connected cluster", False
    if rc.address is None:
        kwargs: dict[str, Any] = {"include_dashboard": False, "_node_ip_address": "127.0.0.1"}
        if rc.num_cpus:
            kwargs["num_cpus"] = rc.num_cpus
        if rc.object_store_mb:
            kwargs["object_store_memory"] = rc.object_store_mb << 20
        if rc.temp_dir:
            kwargs["_temp_dir"] = str(Path(rc.temp_dir).resolve())
        if "RAY_worker_niceness" not in os.environ:
            # Ray runs workers at nice 15; here the actors are the job itself, as the local runner is
            kwargs["_system_config"] = {"worker_niceness": 0}
        ray.init(**kwargs)
        return ray, "a Ray instance started in this process", True
    address = resolve_auto_address() if rc.address == "auto" else rc.address
    check_reachable(address, rc.connect_timeout_s)
    try:
        ray.init(address=address)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"{ADDRESS_KEY}: cannot connect to the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None
    return ray, f"the Ray cluster at {address}", True


def plan_workers(resources: dict, rc: RayConfig, anonymizer: Anonymizer, where: str) -> tuple[int, float]:
    """(number of actors, GPUs per actor), or a ConfigError when the cluster cannot hold even one actor."""
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    have = f"{where} has CPU={cpus:g}, GPU={gpus:g}"
    gpw = rc.num_gpus_per_worker
    if gpw is None:
        gpw = 1.0 if anonymizer.device_kind == "gpu" and gpus >= 1 else 0.0
    if gpw > 0 and gpus < gpw:
        raise ConfigError(
            f"{GPU_KEY}={gpw:g} but {have}; set {GPU_KEY}=0 to run on CPUs, or connect to a cluster with GPUs "
            f"({ADDRESS_KEY})"
        )
    if rc.num_cpus_per_worker > cpus:
        raise ConfigError(f"{CPU_KEY}={rc.num_cpus_per_worker:g} but {have}")
    if rc.num_workers:
        n = rc.num_workers
    elif gpw > 0:
        n = int(gpus // gpw)
    else:
        n = int(cpus // rc.num_cpus_per_worker) if rc.num_cpus_per_worker > 0 else int(cpus)
    return max(1, n), gpw
