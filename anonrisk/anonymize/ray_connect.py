"""Connecting the Ray runner to a cluster (or starting Ray in this process), sizing its actor pool and
choosing each actor's device. Public Ray APIs only; Ray is imported inside functions."""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from urllib.parse import urlparse

from anonrisk.anonymize.base import Anonymizer
from anonrisk.config.schema import RayConfig
from anonrisk.errors import ConfigError

log = logging.getLogger("anonrisk.ray")

ADDRESS_KEY = "anonymize.ray.address"
DEFAULT_PORTS = {"ray": 10001, "": 6379}
START_ONLY = ("num_cpus", "object_store_mb", "temp_dir")  # settings of a Ray this process starts


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
            f"anonymize.runner=ray`, or give the GCS address (host:6379) or ray://host:10001"
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


def check_reachable(address: str, timeout: float, key: str = ADDRESS_KEY) -> None:
    """Fail fast (``timeout`` seconds) on an address nobody listens on, before Ray's own long retries."""
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        reason = "timed out" if isinstance(exc, (socket.timeout, TimeoutError)) else (exc.strerror or type(exc).__name__)
        raise ConfigError(
            f"{key}: no Ray cluster reachable at {address} ({host}:{port}: {reason} after at most {timeout:g} s); "
            f"start one (`ray start --head`), fix the address, or leave {ADDRESS_KEY} unset to start Ray in this process"
        ) from None


@dataclass
class Connection:
    ray: Any
    where: str  # how this process reached Ray, as the log and the DONE summary say it
    started: bool  # this process called ray.init (and so calls ray.shutdown)


@contextmanager
def _env(**values: Optional[str]) -> Iterator[None]:
    """Environment variables set while Ray starts (its raylet and workers inherit them), then restored."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _gcs(ray) -> str:
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # Ray Client connections have no GCS client in this process
        return "?"


def connect(rc: RayConfig) -> Connection:
    """Connect to the configured cluster, to the one ``RAY_ADDRESS`` names (``ray job submit`` sets it), or
    start Ray in this process, in that order; the description says which it was."""
    ray = import_ray()
    if ray.is_initialized():  # a caller (a test, a notebook) already connected: use that cluster as is
        return Connection(ray, f"the Ray cluster this process was already connected to ({_gcs(ray)})", False)
    env = os.environ.get("RAY_ADDRESS") or None
    if rc.address is None and env is None:
        return _start_here(ray, rc)
    if rc.address is None or (rc.address == "auto" and env not in (None, "auto")):
        address, source = env, f"RAY_ADDRESS{' (' + ADDRESS_KEY + '=auto)' if rc.address else ''}"
    else:
        address, source = rc.address, ADDRESS_KEY
    ignored = [f"anonymize.ray.{k}" for k in START_ONLY if getattr(rc, k) is not None]
    if ignored:
        log.warning("%s: only used when Ray starts in this process; ignored (joining the cluster of %s)", ", ".join(ignored), source)
    if address != "auto":
        check_reachable(address, rc.connect_timeout_s, ADDRESS_KEY if source == ADDRESS_KEY else "RAY_ADDRESS")
    try:
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if address == "auto":
            raise ConfigError(f"{ADDRESS_KEY}=auto: no Ray cluster found on this node ({why}); start one with `ray start --head`, "
                              f"set RAY_ADDRESS, or leave {ADDRESS_KEY} unset to start Ray in this process") from None
        raise ConfigError(f"{source}: cannot connect to the Ray cluster at {address}: {why}") from None
    return Connection(ray, f"the Ray cluster at {_gcs(ray) if not address.startswith('ray://') else address} (from {source})", True)


def _start_here(ray, rc: RayConfig) -> Connection:
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if rc.num_cpus:
        kwargs["num_cpus"] = rc.num_cpus
    if rc.object_store_mb:
        kwargs["object_store_memory"] = rc.object_store_mb << 20
    # RAY_TMPDIR: Ray's files go under <temp_dir>/ray. Ray runs workers at nice 15 by default; here the actors
    # are the job itself, as the local runner's process is (RAY_worker_niceness is Ray's own setting)
    with _env(RAY_TMPDIR=str(Path(rc.temp_dir).resolve()) if rc.temp_dir else None,
              RAY_worker_niceness=os.environ.get("RAY_worker_niceness", "0")):
        ray.init(**kwargs)
    cpus = ray.cluster_resources().get("CPU", 0)
    return Connection(ray, f"a Ray instance started in this process (CPU={cpus:g}; {ADDRESS_KEY} and RAY_ADDRESS unset)", True)


@dataclass
class PoolPlan:
    """The actor pool of one stage: Ray Data's ActorPoolStrategy sizes and each actor's resources."""

    min_size: int
    max_size: int
    initial_size: int
    gpus: float  # per actor
    cpus: float  # per actor

    def describe(self) -> str:
        size = f"{self.min_size}" if self.min_size == self.max_size else f"{self.min_size}-{self.max_size} (starting with {self.initial_size})"
        return f"{size} actor(s), each CPU={self.cpus:g} GPU={self.gpus:g}"


def plan_pool(resources: dict, rc: RayConfig, anonymizer: Anonymizer, shards: int) -> PoolPlan:
    """The pool for ``shards`` pending shards on a cluster that has ``resources`` now.

    GPU actors (``num_gpus_per_worker`` > 0) autoscale between ``min_workers`` and ``max_workers`` (default:
    one per pending shard): Ray Data asks for more actors while shards wait, and actors that do not fit are
    the demand that makes an autoscaler start GPU nodes, so a cluster may start with none. The default of
    ``num_gpus_per_worker`` is 1 for a GPU anonymizer when the cluster has GPUs now, else 0 (set it to 1 to
    have an autoscaler start GPU workers). CPU actors default to filling the CPUs the cluster has now."""
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    gpw = rc.num_gpus_per_worker
    if gpw is None:
        gpw = 1.0 if anonymizer.device_kind == "gpu" and gpus >= 1 else 0.0
        if anonymizer.device_kind == "gpu" and gpw == 0:
            log.warning("a GPU anonymizer on a cluster with no GPU now: CPU actors (set anonymize.ray.num_gpus_per_worker=1 to "
                        "wait for GPU workers an autoscaler starts)")
    shards = max(1, shards)
    if rc.num_workers:
        low = high = rc.num_workers
    elif gpw > 0:
        low, high = rc.min_workers, rc.max_workers or shards
    else:
        fits = int(cpus // rc.num_cpus_per_worker) if rc.num_cpus_per_worker > 0 else int(cpus)
        low, high = rc.min_workers, rc.max_workers or max(rc.min_workers, fits)
    high = max(1, min(high, shards))
    low = min(low, high)
    fits_now = int(gpus // gpw) if gpw > 0 else high
    return PoolPlan(low, high, max(low, min(high, fits_now)), gpw, rc.num_cpus_per_worker)


def actor_device(configured: str, device_kind: str, gpu_ids: list, cuda_available: Callable[[], bool], node: str = "?") -> str:
    """The device an actor's anonymizer computes on.

    A GPU that Ray assigned is a resource label (a test cluster declares fake ones): with
    ``anonymize.device=cpu`` a GPU anonymizer computes on the CPU whatever the label says; with ``auto`` it
    uses CUDA when Ray gave the actor a GPU, and refuses, rather than silently running on the CPU, when
    CUDA sees no device there. CPU kinds always run on the CPU."""
    if device_kind != "gpu" or configured == "cpu" or (configured == "auto" and not gpu_ids):
        return "cpu"
    if not cuda_available():
        raise ConfigError(
            f"anonymize.device={configured}: Ray gave this actor GPU {gpu_ids or '(none)'} on node {node[:12]}, but CUDA sees no "
            f"device there; set anonymize.device=cpu to compute on the CPU (e.g. with fake GPU resources), or fix the node's driver"
        )
    return "cuda" if configured == "auto" else configured  # Ray sets CUDA_VISIBLE_DEVICES: cuda:0 is this actor's GPU
