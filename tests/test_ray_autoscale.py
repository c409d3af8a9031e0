"""The Ray runner on an autoscaling cluster that starts with no GPU worker (Ray's fake multi-node provider).

The head (CPU only, no GPU) runs the autoscaler with the ``fake_multinode`` provider: its ``gpu_worker`` node
type declares a fake GPU and starts at ``min_workers: 0``, so every GPU node exists only because the stage's
pending GPU actors asked for it; the provider starts it as real Ray processes on this machine. This is what
``ray.cluster_utils.AutoscalingCluster`` sets up, started here by hand because that class runs `ray stop
--force` (every Ray of this user, other test sessions' included) and needs the default port. One cluster
serves the module.

The fake GPU is a resource label: the actors compute on the CPU (``anonymize.device: cpu``).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from anonrisk.pipeline import Pipeline
from anonrisk.stages import read_json
from tests.ray_helpers import (FAKE_CLUSTER_ENV, SLOW, actor_with_outputs, alive, anonymize_in_thread, assert_each_record_written_once,
                               fake_autoscaling_config, outputs, run_config, start_head, wait_for)

pytestmark = pytest.mark.slow
GPU_NODES_MAX = 3


@pytest.fixture(scope="module")
def cluster():
    with start_head(num_cpus=1, extra_env=FAKE_CLUSTER_ENV, config=lambda gcs: fake_autoscaling_config(gcs, GPU_NODES_MAX)) as head:
        yield head


def gpu_config(runs_dir, anonymizer, **ray):
    ray = {"num_gpus_per_worker": 1, "num_cpus_per_worker": 1, "decode": "tasks", "wait_for_workers_s": 240, **ray}
    cfg = run_config(runs_dir, anonymizer, **ray)
    cfg.anonymize.device = "cpu"  # the fake GPU is a label: compute on the CPU inside the GPU actor
    return cfg


def worker_nodes() -> dict:
    import ray

    return {n["NodeID"]: n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0}


def test_gpu_actors_start_workers_from_zero_and_match_the_local_runner(cluster, tmp_path):
    import ray

    ray.init(address=cluster.gcs, log_to_driver=False)
    try:
        assert ray.cluster_resources().get("GPU", 0) == 0  # no GPU node yet: the stage's demand must start them
        head = ray.get_runtime_context().get_node_id()
        pipe = Pipeline(gpu_config(tmp_path / "ray", "resynth", min_workers=2, max_workers=2))
        stage = pipe.anonymize(pipe.cfg.anonymizers[0]).path
        gpu_nodes = worker_nodes()
    finally:
        ray.shutdown()
    summary = read_json(stage / "DONE")
    markers = [read_json(p) for p in sorted((stage / "shards").glob("*.json"))]
    nodes = {m["worker"]["node"] for m in markers}
    assert summary["computed"] == 32 and summary["pool"]["num_gpus_per_worker"] == 1
    assert head not in nodes and nodes <= set(gpu_nodes) and len(nodes) == 2  # both autoscaled GPU nodes ran shards
    assert all(m["worker"]["gpu_ids"] and m["worker"]["device"] == "cpu" for m in markers)

    local = Pipeline(run_config(tmp_path / "local", "resynth", runner="local"))
    local_stage = local.anonymize(local.cfg.anonymizers[0]).path
    a, b = outputs(stage), outputs(local_stage)
    assert sorted(a) == sorted(b) and len(a) == 32 and all(np.array_equal(a[k], b[k]) for k in a)


def raylet_of(pid: int) -> int:
    """The raylet that spawned a worker process: its parent."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def descendants(pid: int) -> list[int]:
    children = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                children.setdefault(raylet_of(int(d.name)), []).append(int(d.name))
            except (FileNotFoundError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def test_killed_worker_node_loses_and_duplicates_no_record(cluster, tmp_path):
    """SIGKILL a whole GPU worker node (its raylet and every process under it) mid-stage: Ray Data restarts
    the lost actor on a GPU node (a surviving one or one the autoscaler adds) and reruns its shard; every
    record is written exactly once."""
    import ray

    ray.init(address=cluster.gcs, log_to_driver=False)
    try:
        pipe = Pipeline(gpu_config(tmp_path / "runs", SLOW, batch_size=1, num_workers=2))
        stage, runner, result = anonymize_in_thread(pipe, pipe.cfg.anonymizers[0])
        actor = wait_for(lambda: actor_with_outputs(stage.path), 240, "an actor to write two outputs")
        raylet = raylet_of(actor)
        assert "raylet" in Path(f"/proc/{raylet}/cmdline").read_text(), "the actor's parent is not a raylet"
        victims = descendants(raylet)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        done_at_kill = len(list((stage.path / "images").rglob("*.png")))
        runner.join(420)
        assert not runner.is_alive() and "stage" in result, "the stage did not finish after the node was lost"
    finally:
        ray.shutdown()
    assert done_at_kill < 32  # the kill landed mid-stage
    assert not any(alive(p) for p in victims)
    assert_each_record_written_once(stage, pipe.records)
