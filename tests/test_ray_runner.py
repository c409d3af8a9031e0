"""The Ray runner against a real local Ray cluster (`ray start --head` on 127.0.0.1, `ray job submit`).

One head node serves the whole file (module fixture): it runs in its own process group under its own
temp dir and ports, and teardown signals that group only, so no other Ray on the machine is touched.
The test process connects to it as a driver for the in-process tests; jobs and killed drivers are
subprocesses.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from anonrisk.anonymize.ray_connect import actor_device, parse_address, plan_pool
from anonrisk.anonymize.runner import output_path
from anonrisk.config.schema import RayConfig
from anonrisk.errors import ConfigError
from anonrisk.pipeline import Pipeline
from anonrisk.stages import read_json
from tests.ray_helpers import (ENV, RAY_BIN, REPO, SLOW, actor_with_outputs, alive, anonymize_in_thread,
                               assert_each_record_written_once, free_port, outputs, run_config, start_head, wait_for,
                               write_config, writes)


@pytest.fixture(scope="module")
def ray_head():
    with start_head() as head:
        yield head


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


def test_pool_plan_from_cluster_resources_and_pending_shards():
    class Cpu:
        device_kind = "cpu"

    class Gpu:
        device_kind = "gpu"

    def plan(resources, rc, anonymizer, shards=100):
        p = plan_pool(resources, rc, anonymizer, shards)
        return p.min_size, p.max_size, p.initial_size, p.gpus

    rc = RayConfig()
    assert plan({"CPU": 2.0}, rc, Cpu()) == (1, 2, 2, 0.0)  # CPU actors: up to the CPUs there are
    assert plan({"CPU": 2.0}, rc, Gpu()) == (1, 2, 2, 0.0)  # a GPU anonymizer on a CPU cluster: CPU actors
    assert plan({"CPU": 64.0, "GPU": 8.0}, rc, Gpu()) == (1, 100, 8, 1.0)  # starts with the GPUs there are, grows to the shards
    assert plan({"CPU": 64.0, "GPU": 8.0}, rc, Gpu(), shards=3) == (1, 3, 3, 1.0)  # never more actors than pending shards
    assert plan({"CPU": 64.0, "GPU": 8.0}, RayConfig(num_gpus_per_worker=2), Gpu()) == (1, 100, 4, 2.0)
    assert plan({"CPU": 64.0, "GPU": 8.0}, RayConfig(num_workers=3), Cpu()) == (3, 3, 3, 0.0)
    # from zero GPUs (an autoscaler adds GPU nodes): the pool asks for min_workers at once, up to max_workers
    assert plan({"CPU": 2.0}, RayConfig(num_gpus_per_worker=1, min_workers=2, max_workers=6), Gpu()) == (2, 6, 2, 1.0)


def test_actor_device_treats_a_fake_gpu_as_a_label():
    """A GPU Ray assigned is a resource label: device=cpu computes on the CPU; auto uses CUDA only with a GPU
    assigned and refuses when CUDA sees none (a fake GPU) instead of silently running on the CPU."""
    no_cuda, cuda = (lambda: False), (lambda: True)
    assert actor_device("cpu", "gpu", ["0"], no_cuda) == "cpu"
    assert actor_device("auto", "gpu", [], no_cuda) == "cpu"
    assert actor_device("auto", "gpu", ["0"], cuda) == "cuda"
    assert actor_device("auto", "cpu", ["0"], no_cuda) == "cpu"
    with pytest.raises(ConfigError, match=r"anonymize\.device=auto: Ray gave this actor GPU \['0'\].*set anonymize\.device=cpu"):
        actor_device("auto", "gpu", ["0"], no_cuda)


def test_relative_output_dirs_are_refused_only_inside_a_ray_job(monkeypatch, tmp_path):
    from anonrisk.config import load_config

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert load_config(None, ["runs_dir=runs"]).runs_dir == "runs"  # outside a job: relative to the cwd, as always
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_abc.zip"}}))
    with pytest.raises(ConfigError, match=r"^runs_dir: 'runs' is relative, and this runs as a Ray job \(--working-dir gcs://_ray_pkg_abc\.zip\)"):
        load_config(None, ["runs_dir=runs", f"results_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^results_dir: 'results' is relative.*results_dir=\$PWD/results"):
        load_config(None, [f"runs_dir={tmp_path}"])
    assert load_config(None, [f"runs_dir={tmp_path}", f"results_dir={tmp_path}"]).runs_dir == str(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}}))  # no --working-dir: still Ray's cwd
    with pytest.raises(ConfigError, match=r"Ray job \(no --working-dir\)"):
        load_config(None, ["runs_dir=runs"])


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


def locked(name: str) -> str:
    """The version requirements/lock.txt pins for a package."""
    import re

    m = re.search(rf"^{re.escape(name)}==(\S+)", (REPO / "requirements" / "lock.txt").read_text(), re.M)
    assert m, f"{name} is not in the lock file"
    return m.group(1)


def test_cluster_launcher_config_boots_after_rays_own_preparation():
    """configs/ray/cluster.yaml as `ray up` sees it (Ray's default fill-in and schema check): boto3 on the head,
    a pinned image with the lock file's Ray and Python and the torch wheels' CUDA, Ray and torch pinned to the
    lock, every install into the `python` that `ray submit` runs, GPU workers from zero."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "configs" / "ray" / "cluster.yaml").read_text())
    cfg = prepare_config(raw)  # fills in the provider's defaults, as `ray up` does
    validate_config(cfg)  # raises on an unknown or missing field
    assert any("boto3" in c for c in cfg["head_setup_commands"])  # the AWS autoscaler on the head imports it
    ray_version, torch_version = locked("ray"), locked("torch")
    cuda = locked("nvidia-cuda-runtime").split(".")[:2]  # the CUDA the locked torch wheels are built for
    py = "".join(__import__("platform").python_version_tuple()[:2])
    assert cfg["docker"]["image"] == f"rayproject/ray:{ray_version}-py{py}-cu{''.join(cuda)}"
    assert all(n["node_config"].get("ImageId") for n in cfg["available_node_types"].values())  # not Ray's old default AMI
    setup = cfg["setup_commands"]
    assert f'"ray[default]=={ray_version}"' in " ".join(setup) and f"torch=={torch_version}" in " ".join(setup)
    assert f"whl/cu{''.join(cuda)}" in " ".join(setup)
    pips = [c for c in setup + cfg["head_setup_commands"] if "pip" in c]
    assert pips and all(c.startswith("python -m pip ") for c in pips)  # the interpreter `ray submit` runs
    gpu = cfg["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["node_config"]["InstanceType"].startswith(("g", "p"))
    docs = (REPO / "docs" / "ray.md").read_text()
    for command in ("ray up", "ray dashboard", "ray job submit --address", "--working-dir", "ray submit --tmux", "ray down"):
        assert command in docs, command


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


def test_gpu_request_on_a_cpu_cluster_times_out_with_a_clear_error(ray_driver, tmp_path):
    """No node has a GPU and no autoscaler adds one: after wait_for_workers_s the error names what is missing."""
    cfg = run_config(tmp_path / "runs", "resynth", num_gpus_per_worker=1, wait_for_workers_s=2)
    pipe = Pipeline(cfg)
    with pytest.raises(ConfigError, match=r"no Ray actor started within anonymize\.ray\.wait_for_workers_s=2 s; each needs CPU=1, GPU=1.* has CPU=2, GPU=0"):
        pipe.anonymize(pipe.cfg.anonymizers[0])
    assert not list((tmp_path / "runs" / "anonymize").glob("*/*/images/**/*.png"))


def submit(ray_head, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir WORKDIR -- anonrisk ARGS`, as a user types it in WORKDIR."""
    runtime_env = json.dumps({"env_vars": {k: ENV[k] for k in ("PYTHONPATH", "OMP_NUM_THREADS", "RAY_AUTH_MODE")}})
    return subprocess.run([str(RAY_BIN), "job", "submit", "--address", ray_head.dashboard, "--working-dir", ".", "--runtime-env-json",
                           runtime_env, "--", sys.executable, "-m", "anonrisk", *args], capture_output=True, text=True, env=ray_head.env,
                          timeout=300, cwd=workdir)


def test_job_submit_refuses_a_relative_runs_dir(ray_head, tmp_path):
    """With --working-dir the job runs in a copy Ray deletes: a relative runs_dir is refused, saying how to fix it."""
    (tmp_path / "job").mkdir()
    write_config(tmp_path / "job" / "c.yaml", run_config("runs", "resynth"))
    res = submit(ray_head, tmp_path / "job", "anonymize", "c.yaml")
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "anonrisk: error: runs_dir: 'runs' is relative, and this runs as a Ray job (--working-dir" in out, out[-3000:]
    assert "runs_dir=$PWD/runs" in out and "Traceback" not in out


@pytest.mark.slow
def test_job_submit_with_two_actors_equals_the_single_process_runner(ray_head, tmp_path):
    """`ray job submit --working-dir . -- anonrisk anonymize c.yaml runs_dir=ABS` on the head: outputs where the
    user asked, image for image like the local runner, and the log says it joined the head's cluster."""
    (tmp_path / "job").mkdir()
    write_config(tmp_path / "job" / "c.yaml", run_config("runs", "resynth"))
    t0 = time.monotonic()
    res = submit(ray_head, tmp_path / "job", "anonymize", "c.yaml", f"runs_dir={tmp_path / 'ray'}", f"results_dir={tmp_path / 'results'}",
                 "anonymize.ray.num_workers=2",
                 "anonymize.ray.decode=tasks")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    print(f"job submit to done: {time.monotonic() - t0:.1f} s")
    ray_stage = next((tmp_path / "ray" / "anonymize").glob("*/*/DONE")).parent
    summary = read_json(ray_stage / "DONE")
    assert summary["connected"] == f"the Ray cluster at {ray_head.gcs} (from RAY_ADDRESS)"
    assert f"on the Ray cluster at {ray_head.gcs} (from RAY_ADDRESS)" in res.stdout + res.stderr
    assert summary["runner"] == "ray" and summary["computed"] == 32 and summary["decode"] == "tasks"
    # a pool of two; Ray Data hands each decoded shard to a free actor, so on a loaded machine one may take them all
    assert summary["pool"]["min"] == summary["pool"]["max"] == 2 and 1 <= len(summary["worker_pids"]) <= 2

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
    # each actor runs one shard at a time, though Ray Data gives it prefetch_shards concurrent calls: the writes
    # in each actor's log come shard by shard, never interleaved
    for log_file in (ray_stage / "log").glob("writes-*.jsonl"):
        order = [json.loads(line)["shard"] for line in log_file.read_text().splitlines()]
        runs = [k for k, _ in itertools.groupby(order)]
        assert len(runs) == len(set(runs)), (log_file.name, order)


@pytest.mark.slow
def test_killed_actor_loses_and_duplicates_no_record(ray_driver, tmp_path):
    """SIGKILL one actor process mid-run: Ray Data's pool restarts it and reruns its shard; every record is
    written exactly once (outputs that exist are skipped)."""
    cfg = run_config(tmp_path / "runs", SLOW, batch_size=1, num_workers=2, decode="tasks")
    pipe = Pipeline(cfg)
    stage, runner, result = anonymize_in_thread(pipe, pipe.cfg.anonymizers[0])
    victim = wait_for(lambda: actor_with_outputs(stage.path), 120, "an actor to write two outputs")
    os.kill(victim, signal.SIGKILL)
    pids_at_kill = {int(f.stem.rsplit("-", 1)[1]) for f in (stage.path / "log").glob("writes-*.jsonl")}
    done_at_kill = len(list((stage.path / "images").rglob("*.png")))
    runner.join(300)
    assert not runner.is_alive() and "stage" in result
    assert done_at_kill < 32  # the kill landed mid-run

    assert_each_record_written_once(stage, pipe.records)
    summary = read_json(stage / "DONE")
    assert set(summary["worker_pids"]) - pids_at_kill, "no shard finished on the restarted actor"
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
    images = lambda: sorted((tmp_path / "runs" / "anonymize").glob("*/*/images/**/*.png"))  # noqa: E731
    try:
        wait_for(lambda: len(images()) >= 6, 180, "six outputs")
    finally:
        driver.kill()
        driver.wait()
    stage_path = images()[0].parents[2]  # <stage>/images/<identity>/<image id>.png (ids are relative paths)
    pids = {int(f.stem.rsplit("-", 1)[1]) for f in (stage_path / "log").glob("writes-*.jsonl")}
    wait_for(lambda: not any(alive(p) for p in pids), 30, "the dead driver's actors to exit")
    before = {str(p.relative_to(stage_path)): p.stat().st_ino for p in images()}
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
    assert {k: v for k, v in ((str(p.relative_to(stage_path)), p.stat().st_ino) for p in images()) if k in before} == before  # not rewritten
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
