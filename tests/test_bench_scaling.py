"""The steady-state rate of benchmarks/anonymize_scaling.py (the figure its 0.95x line is read on): per worker,
the records after its first shard over the time between its first and last marker, summed over workers."""

import importlib.util
import json
import os
from pathlib import Path
from unittest import mock

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "anonymize_scaling.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("anonymize_scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    with mock.patch.dict(os.environ):  # the script sets thread and Ray variables for its own process
        spec.loader.exec_module(module)
    return module


def markers(folder: Path, shards: list[tuple[float, int, int | None]]) -> Path:
    folder.mkdir(parents=True)
    for k, (t, records, pid) in enumerate(shards):
        path = folder / f"{k:05d}.json"
        path.write_text(json.dumps({"records": records, **({"worker": {"pid": pid}} if pid is not None else {})}))
        os.utime(path, (1000.0 + t, 1000.0 + t))
    return folder


def test_steady_rate_is_per_worker_and_leaves_out_each_first_shard(tmp_path):
    rate = load_benchmark().steady_rate
    # the local runner (no worker in its markers): shards end at 0, 2, 4 s -> 20 records in 4 s
    assert rate(markers(tmp_path / "local", [(0, 10, None), (2, 10, None), (4, 10, None)])) == 5.0
    # two workers in step, 10 records per second each: 20 img/s (one clock over all markers would say 50 / 2 s = 25)
    two = [(0, 10, 1), (0, 10, 2), (1, 10, 1), (1, 10, 2), (2, 10, 1), (2, 10, 2)]
    assert rate(markers(tmp_path / "two", two)) == 20.0
    # a worker with a single shard adds nothing (no interval of its own); a stage of one shard has no steady state
    assert rate(markers(tmp_path / "one-each", [(0, 10, 1), (1, 10, 1), (5, 10, 2)])) == 10.0
    assert rate(markers(tmp_path / "single", [(0, 64, None)])) == 0.0
