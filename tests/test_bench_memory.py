"""The CPU memory measure of benchmarks/train_throughput.py (the counterpart of
``torch.cuda.max_memory_allocated`` its batch-limit search caps): it sees a known live allocation, and past
the cap the worker stops itself with status 3 and says so."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"
spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

pytestmark = pytest.mark.skipif(bench._mallinfo2() is None, reason="needs glibc's mallinfo2 (glibc >= 2.33)")


def test_peak_is_the_live_allocation():
    monitor = bench.PeakMemory(None)
    x = torch.ones(16 * 2**20)  # 64 MiB, every page touched
    time.sleep(0.1)  # the sampler runs every 2 ms
    del x
    time.sleep(0.05)
    monitor._stop = True
    assert 63 * 2**20 <= monitor.peak <= 72 * 2**20, monitor.peak / 2**20


def test_past_the_cap_the_process_stops_itself():
    code = ("import time, torch; from train_throughput import PeakMemory; m = PeakMemory(32 * 2**20); "
            "x = torch.ones(16 * 2**20); time.sleep(2); print('not stopped')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=SCRIPT.parent, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-500:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["fits"] is False and report["peak_mem_gb"] > 32 / 1024
