"""The Ray runner against a real local Ray cluster (`ray start --head` on 127.0.0.1, `ray job submit`).

One head node serves the whole file (module fixture): it runs in its own process group under its own
temp dir and ports, and teardown signals that group only, so no other Ray on the machine is touched.
The test process connects to it as a driver for the in-process tests; jobs and killed drivers are
subprocesses.
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
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from anonrisk.anonymize.ray_connect import parse_address, plan_workers
from anonrisk.anonymize.runner import output_path
from anonrisk.config.schema import RayConfig, RunConfig
from anonrisk.data.io import load_image
from anonrisk.data.records import read_manifest
from anonrisk.errors import ConfigError
from anonrisk.pipeline import Pipeline
from anonrisk.stages import read_json

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


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` on loopback with its own ports and temp dir, in a new process group."""
    tmp = tempfile.mkdtemp(prefix="anonrisk-ray-", dir="/tmp")  # short: Ray's socket paths are length-limited
    names = ["port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port"]
    ports = {n: free_port() for n in names}
    low = free_port()
    cmd = [str(RAY_BIN), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2",
           f"--temp-dir={tmp}", "--object-store-memory=200000000", "--include-dashboard=true", "--disable-usage-stats",
           f"--min-worker-port={low}", f"--max-worker-port={low + 100}"] + [f"--{n}={p}" for n, p in ports.items()]
    env = {**os.environ, **ENV}
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
        wait_for(up, 60, "the Ray head's dashboard", every=0.3)
        print(f"\nray head up in {time.monotonic() - t0:.1f} s")
        yield SimpleNamespace(gcs=f"127.0.0.1:{ports['port']}", dashboard=dashboard, env=env, tmp=tmp)
    finally:
        # the group is ours alone (start_new_session) and the cluster is throwaway: no graceful drain
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        wait_for(lambda: not group_pids(proc.pid), 15, "the head's processes to exit")
        subprocess.run(["rm", "-rf", tmp], check=False)


@pytest.fixture(scope="module")
def ray_driver(ray_head):
    """This test process as a driver of the head (the runner uses an existing connection as is)."""
    import ray

    ray.init(address=ray_head.gcs, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}}, log_to_driver=False)
    yield ray
    ray.shutdown()


# ---- checks that need no cluster -----------------------------------------------------------------------


def test_addresses_parse_or_name_the_key():
    assert parse_address("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert parse_address("ray://head") == ("head", 10001)
    assert parse_address("ray://head:2345") == ("head", 2345)
    with pytest.raises(ConfigError, match=r"anonymize\.ray\.address.*dashboard.*ray job submit --address http://h:8265"):
        parse_address("http://h:8265")
    assert parse_address("head") == ("head", 6379)  # the GCS port when none is given
    with pytest.raises(ConfigError, match=r"anonymize\.ray\.address.*'head:port'"):
        parse_address("head:port")


def test_worker_plan_from_cluster_resources():
    class Cpu:
        device_kind = "cpu"

    class Gpu:
        device_kind = "gpu"

    rc = RayConfig()
    assert plan_workers({"CPU": 2.0}, rc, Cpu(), "c") == (2, 0.0)
    assert plan_workers({"CPU": 2.0}, rc, Gpu(), "c") == (2, 0.0)  # a GPU anonymizer on a CPU cluster: CPU actors
    assert plan_workers({"CPU": 64.0, "GPU": 8.0}, rc, Gpu(), "c") == (8, 1.0)  # one actor per GPU
    assert plan_workers({"CPU": 64.0, "GPU": 8.0}, RayConfig(num_gpus_per_worker=2), Gpu(), "c") == (4, 2.0)
    assert plan_workers({"CPU": 64.0, "GPU": 8.0}, RayConfig(num_workers=3), Cpu(), "c") == (3, 0.0)
    with pytest.raises(ConfigError, match=r"anonymize\.ray\.num_gpus_per_worker=1 but the test cluster has CPU=2, GPU=0"):
        plan_workers({"CPU": 2.0}, RayConfig(num_gpus_per_worker=1), Gpu(), "the test cluster")
    with pytest.raises(ConfigError, match=r"anonymize\.ray\.num_cpus_per_worker=4"):
        plan_workers({"CPU": 2.0}, RayConfig(num_cpus_per_worker=4), Cpu(), "c")


def test_png_writer_threads_write_the_same_files_once(tmp_path):
    """run_shard with writer threads beside the anonymizer: same bytes as inline writes, each record once."""
    from anonrisk.anonymize import build_anonymizer
    from anonrisk.anonymize.runner import run_shard
    from anonrisk.config.schema import Spec
    from anonrisk.pipeline import prepare_data as prepare

    cfg = run_config(tmp_path / "runs", "resynth")
    _, records = prepare(cfg.data, str(tmp_path / "runs"), progress=False)
    anonymizer = build_anonymizer(Spec(name="resynth", kind="resynth"))
    seen = {0: [], 3: []}
    for threads in seen:
        t = run_shard(anonymizer, records, tmp_path / f"w{threads}", 64, 5, 0, on_write=lambda r, t=threads: seen[t].append(r.id),
                      write_threads=threads)
        assert t["computed"] == 32
    assert sorted(seen[3]) == sorted(seen[0]) == sorted(r.id for r in records)
    for r in records:
        assert output_path(tmp_path / "w3", r).read_bytes() == output_path(tmp_path / "w0", r).read_bytes()


def test_cluster_launcher_config_matches_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((REPO / "configs" / "ray" / "cluster.yaml").read_text())
    validate_config(prepare_config(cfg))  # raises on an unknown or missing field
    assert cfg["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert any("anonrisk[ray" in c for c in cfg["setup_commands"])


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_unreachable_address_fails_fast_before_any_output(tmp_path, address):
    """A fresh CLI process (no Ray connection yet): exit 2 within seconds, the message names key and address."""
    address = address.format(port=free_port())  # nothing listens there
    cfg = write_config(tmp_path / "c.yaml", run_config(tmp_path / "runs", "resynth"))
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "anonrisk", "anonymize", str(cfg), f"anonymize.ray.address={address}",
                          "anonymize.ray.connect_timeout_s=3"], capture_output=True, text=True, env={**os.environ, **ENV}, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "anonrisk: error: anonymize.ray.address: no Ray cluster reachable at " + address in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs" / "anonymize").exists()
    assert time.monotonic() - t0 < 60


# ---- a real cluster ----------------------------------------------------------------------------------


def test_gpu_request_on_a_cpu_cluster_is_refused_before_any_output(ray_driver, tmp_path):
    cfg = run_config(tmp_path / "runs", "resynth", num_gpus_per_worker=1)
    pipe = Pipeline(cfg)
    with pytest.raises(ConfigError, match=r"anonymize\.ray\.num_gpus_per_worker=1 but the connected cluster has CPU=2, GPU=0"):
        pipe.anonymize(pipe.cfg.anonymizers[0])
    assert not (tmp_path / "runs" / "anonymize").exists()


@pytest.mark.slow
def test_job_submit_with_two_actors_equals_the_single_process_runner(ray_head, tmp_path):
    """`ray job submit -- anonrisk anonymize ... address=auto` on the head; image for image like the local runner."""
    cfg = write_config(tmp_path / "c.yaml", run_config(tmp_path / "ray", "resynth"))
    runtime_env = json.dumps({"env_vars": {k: ENV[k] for k in ("PYTHONPATH", "OMP_NUM_THREADS", "RAY_AUTH_MODE")}})
    t0 = time.monotonic()
    res = subprocess.run([str(RAY_BIN), "job", "submit", "--address", ray_head.dashboard, "--runtime-env-json", runtime_env, "--",
                          sys.executable, "-m", "anonrisk", "anonymize", str(cfg), "anonymize.ray.address=auto",
                          "anonymize.ray.num_workers=2", "anonymize.ray.decode=tasks"], capture_output=True, text=True, env=ray_head.env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    print(f"job submit to done: {time.monotonic() - t0:.1f} s")
    ray_stage = next((tmp_path / "ray" / "anonymize").glob("*/*/DONE")).parent
    summary = read_json(ray_stage / "DONE")
    assert summary["runner"] == "ray" and summary["workers"] == 2 and summary["computed"] == 32 and summary["decode"] == "tasks"
    assert len(summary["worker_pids"]) == 2  # both actors ran shards

    local = Pipeline(run_config(tmp_path / "local", "resynth", runner="local"))
    local_stage = local.anonymize(local.cfg.anonymizers[0]).path
    assert local_stage.relative_to(tmp_path / "local") == ray_stage.relative_to(tmp_path / "ray")  # one fingerprint
    a, b = outputs(ray_stage), outputs(local_stage)
    assert sorted(a) == sorted(b) and len(a) == 32
    assert all(np.array_equal(a[k], b[k]) for k in a)
    markers = sorted(p.name for p in (ray_stage / "shards").glob("*.json"))
    assert markers == sorted(p.name for p in (local_stage / "shards").glob("*.json"))
    m = read_json(ray_stage / "shards" / markers[0])
    assert m["ids"] == read_json(local_stage / "shards" / markers[0])["ids"] and m["seconds"] > 0 and "worker" in m


@pytest.mark.slow
@pytest.mark.parametrize("recovery", ["ray-restart", "driver-replace"])
def test_killed_actor_loses_and_duplicates_no_record(ray_driver, tmp_path, recovery):
    """SIGKILL one actor process mid-run: Ray restarts it and reruns its shards (ray-restart), or, with no
    restarts allowed, the driver replaces it and sends its shards again (driver-replace); either way every
    record is written exactly once."""
    no_restart = {"max_restarts": 0, "max_task_retries": 0} if recovery == "driver-replace" else {}
    cfg = run_config(tmp_path / "runs", SLOW, batch_size=1, num_workers=2, decode="tasks", **no_restart)
    pipe = Pipeline(cfg)
    spec = pipe.cfg.anonymizers[0]
    stage = pipe.target(spec).anonymize
    result = {}
    runner = threading.Thread(target=lambda: result.update(stage=pipe.anonymize(spec)))
    runner.start()

    def a_writer_with_two_outputs():
        for f in (stage.path / "log").glob("writes-*.jsonl"):
            if len(f.read_text().splitlines()) >= 2:
                return int(f.stem.rsplit("-", 1)[1])  # the actor's own os.getpid()
        return None

    victim = wait_for(a_writer_with_two_outputs, 120, "an actor to write two outputs")
    os.kill(victim, signal.SIGKILL)
    pids_at_kill = {int(f.stem.rsplit("-", 1)[1]) for f in (stage.path / "log").glob("writes-*.jsonl")}
    done_at_kill = len(list((stage.path / "images").glob("*.png")))
    runner.join(300)
    assert not runner.is_alive() and "stage" in result
    assert done_at_kill < 32  # the kill landed mid-run

    ids = [r.id for r in pipe.records]
    assert sorted(r.id for r in read_manifest(stage / "manifest.jsonl")) == sorted(ids)
    assert all(output_path(stage.path, r).exists() for r in pipe.records)
    counts = {}
    for w in writes(stage.path):
        counts[w["id"]] = counts.get(w["id"], 0) + 1
    assert sorted(counts) == sorted(ids) and set(counts.values()) == {1}, "a record was written twice or never"
    summary = read_json(stage / "DONE")
    if recovery == "ray-restart":  # Ray reran the victim's shard on its restarted process
        assert set(summary["worker_pids"]) - pids_at_kill, "no shard finished on the restarted actor"
        assert summary["redispatched"] == 0
    else:  # the driver queued the victim's shards again (the survivor or the replacement took them)
        assert summary["redispatched"] >= 1
    assert not alive(victim)


@pytest.mark.slow
def test_killed_driver_rerun_redoes_only_unfinished_records(ray_head, tmp_path):
    """SIGKILL the driver (a CLI process on the head): its actors die with it; a rerun (here with Ray started
    in-process) computes exactly the records without output and leaves the finished files untouched."""
    cfg = run_config(tmp_path / "runs", SLOW, batch_size=1, num_workers=2)
    path = write_config(tmp_path / "c.yaml", cfg)
    cmd = [sys.executable, "-m", "anonrisk", "anonymize", str(path)]
    driver = subprocess.Popen(cmd + [f"anonymize.ray.address={ray_head.gcs}"], env=ray_head.env,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "driver.log", "w"))
    images = lambda: sorted((tmp_path / "runs" / "anonymize").glob("*/*/images/*.png"))  # noqa: E731
    try:
        wait_for(lambda: len(images()) >= 6, 180, "six outputs")
    finally:
        driver.kill()
        driver.wait()
    stage_path = images()[0].parents[1]
    pids = {int(f.stem.rsplit("-", 1)[1]) for f in (stage_path / "log").glob("writes-*.jsonl")}
    wait_for(lambda: not any(alive(p) for p in pids), 30, "the dead driver's actors to exit")
    before = {p.name: p.stat().st_ino for p in images()}
    assert 6 <= len(before) < 32 and not (stage_path / "DONE").exists()

    tmp = tempfile.mkdtemp(prefix="anonrisk-ray-", dir="/tmp")
    try:
        res = subprocess.run(cmd + ["anonymize.ray.num_cpus=2", "anonymize.ray.object_store_mb=100", f"anonymize.ray.temp_dir={tmp}"],
                             env={k: v for k, v in ray_head.env.items() if k != "RAY_ADDRESS"}, capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["rm", "-rf", tmp], check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = read_json(stage_path / "DONE")
    assert summary["computed"] == 32 - len(before)
    assert {p.name: p.stat().st_ino for p in images() if p.name in before} == before  # not rewritten
    assert len(images()) == 32
    counts = {}
    for w in writes(stage_path):
        counts[w["id"]] = counts.get(w["id"], 0) + 1
    assert set(counts.values()) == {1}


@pytest.mark.slow
def test_command_anonymizer_on_ray_equals_the_local_runner(ray_driver, tmp_path):
    """An external program run by the Ray actors, shard by shard: the same outputs and shard logs as locally."""
    spec = {"name": "copy", "kind": "command", "params": {"command": "cp {input}/* {output}/"}}
    ray_pipe = Pipeline(run_config(tmp_path / "ray", spec, num_workers=2))
    ray_stage = ray_pipe.anonymize("copy").path
    local = Pipeline(run_config(tmp_path / "local", spec, runner="local"))
    local_stage = local.anonymize("copy").path
    assert read_json(ray_stage / "DONE")["runner"] == "ray"
    a, b = outputs(ray_stage), outputs(local_stage)
    assert sorted(a) == sorted(b) and len(a) == 32 and all(np.array_equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (ray_stage / "log").glob("command-*.log")) == [f"command-{k:05d}.log" for k in range(8)]
