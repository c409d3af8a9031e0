"""Shared by the Ray test modules: synthetic configs, process helpers and a Ray head of our own.

A head runs in its own process group under its own temp dir and ports; stopping it signals that group only,
so no other Ray on the machine is touched (never `ray stop`, which stops every Ray of this user).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import yaml

from anonrisk.config.schema import RunConfig
from anonrisk.data.io import load_image
from anonrisk.data.records import read_manifest

REPO = Path(__file__).resolve().parents[1]
RAY_BIN = Path(sys.executable).with_name("ray")
ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
       "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}

# 32 synthetic faces at 64 px in shards of 4; a tiny random-weight diffusion model with 16 steps at batch 1
# takes ~0.1 s an image on one core, long enough to kill something mid-run
DATA = {"dataset": "synthetic", "image_size": 64, "synthetic": {"identities": 8, "images_per_identity": 4}}
SLOW = {"name": "tinydiff", "kind": "diffusion",
        "params": {"model": "random:tiny", "mode": "txt2img", "steps": 16, "resolution": 64, "guidance_scale": 7.5}}


def free_port() -> int:
    while True:
        port = random.randint(20000, 40000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


def run_config(runs_dir, anonymizer, runner="ray", batch_size=2, **ray) -> RunConfig:
    if isinstance(anonymizer, str):
        anonymizer = {"name": anonymizer, "kind": anonymizer}
    return RunConfig.model_validate({
        "runs_dir": str(runs_dir), "progress": False, "data": DATA, "anonymizers": [anonymizer],
        "anonymize": {"runner": runner, "shard_size": 4, "batch_size": batch_size, "ray": ray},
    })


def write_config(path: Path, cfg: RunConfig) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def outputs(stage_path: Path) -> dict[str, np.ndarray]:
    return {r.id: load_image(r.path) for r in read_manifest(stage_path / "manifest.jsonl")}


def writes(stage_path: Path) -> list[dict]:
    """Every output write the actors logged (one line per PNG renamed into place)."""
    lines = []
    for f in sorted((stage_path / "log").glob("writes-*.jsonl")):
        lines += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return lines


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


def group_pids(pgid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getpgid(int(d.name)) == pgid and alive(int(d.name)):
                    pids.append(int(d.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def wait_for(cond, timeout: float, what: str, every: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def anonymize_in_thread(pipe, spec):
    """Start ``pipe.anonymize(spec)`` in a thread: (its stage, the thread, a dict that gets ``stage`` at the end)."""
    import threading

    stage, result = pipe.target(spec).anonymize, {}
    runner = threading.Thread(target=lambda: result.update(stage=pipe.anonymize(spec)))
    runner.start()
    return stage, runner, result


def actor_with_outputs(stage_path: Path, n: int = 2) -> int | None:
    """The pid of an actor that has logged ``n`` output writes (its log is writes-<os.getpid()>.jsonl), or None."""
    for f in (stage_path / "log").glob("writes-*.jsonl"):
        if len(f.read_text().splitlines()) >= n:
            return int(f.stem.rsplit("-", 1)[1])
    return None


def assert_each_record_written_once(stage, records) -> None:
    """Manifest, output files and the actors' write logs hold every record exactly once."""
    from anonrisk.anonymize.runner import output_path

    ids = sorted(r.id for r in records)
    assert sorted(r.id for r in read_manifest(stage / "manifest.jsonl")) == ids
    assert all(output_path(stage.path, r).exists() for r in records)
    counts = {}
    for w in writes(stage.path):
        counts[w["id"]] = counts.get(w["id"], 0) + 1
    assert sorted(counts) == ids and set(counts.values()) == {1}, "a record was written twice or never"


FAKE_CLUSTER_ENV = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}  # the head of a fake autoscaling cluster


def fake_autoscaling_config(gcs: str, max_nodes: int, gpus_per_node: int = 1, cpus_per_node: int = 1, head_cpus: int = 1) -> dict:
    """Ray's fake multi-node provider (the fields of its fake_multi_node/example.yaml, which
    ``ray.cluster_utils.AutoscalingCluster`` uses): a head without GPU and a ``gpu_worker`` type with fake GPUs
    at ``min_workers: 0``, whose nodes the autoscaler starts as real Ray processes on this machine."""
    return {
        "cluster_name": "anonrisk-fake", "max_workers": max_nodes,
        "provider": {"type": "fake_multinode", "gcs_address": gcs, "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {"resources": {"CPU": cpus_per_node, "GPU": gpus_per_node, "object_store_memory": 100_000_000},
                           "node_config": {}, "min_workers": 0, "max_workers": max_nodes},
        },
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 5, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


@contextmanager
def start_head(num_cpus: int = 2, extra_env: dict | None = None, extra_args: list[str] = (), config=None):
    """`ray start --head --block` on loopback with its own ports and temp dir, in a new process group.

    ``config(gcs_address) -> dict``: an autoscaling config (written to a file, ``--autoscaling-config``)."""
    tmp = tempfile.mkdtemp(prefix="anonrisk-ray-", dir="/tmp")  # short: Ray's socket paths are length-limited
    names = ["port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port"]
    low = free_port()  # the workers' range is low..low+100; every other port distinct and outside it
    ports: dict[str, int] = {}
    for n in names:
        while (port := free_port()) in ports.values() or low <= port <= low + 100:
            pass
        ports[n] = port
    gcs = f"127.0.0.1:{ports['port']}"
    cmd = [str(RAY_BIN), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
           f"--temp-dir={tmp}", "--object-store-memory=200000000", "--include-dashboard=true", "--disable-usage-stats",
           f"--min-worker-port={low}", f"--max-worker-port={low + 100}", *extra_args] + [f"--{n}={p}" for n, p in ports.items()]
    if config is not None:
        Path(tmp, "autoscaling.json").write_text(json.dumps(config(gcs)))
        cmd.append(f"--autoscaling-config={tmp}/autoscaling.json")
    env = {**os.environ, **ENV, **(extra_env or {})}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=open(f"{tmp}/head.log", "w"), stderr=subprocess.STDOUT)
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"

    def up():
        assert proc.poll() is None, f"ray start exited {proc.returncode}: {Path(tmp, 'head.log').read_text()[-2000:]}"
        try:
            urllib.request.urlopen(f"{dashboard}/api/version", timeout=1)
            return True
        except OSError:
            return False

    try:
        wait_for(up, 90, "the Ray head's dashboard", every=0.3)
        print(f"\nray head up in {time.monotonic() - t0:.1f} s")
        yield SimpleNamespace(gcs=gcs, dashboard=dashboard, env=env, tmp=tmp, pgid=proc.pid)
    finally:
        # the group is ours alone (start_new_session) and the cluster is throwaway: no graceful drain
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # `ray start` exited (it failed to start): nothing left in its group
            pass
        proc.wait()
        wait_for(lambda: not group_pids(proc.pid), 15, "the head's processes to exit")
        subprocess.run(["rm", "-rf", tmp], check=False)
