"""What a user sees from the launcher: one voice under torchrun (rank 0), and a checkpoint-and-stop that ends
with its own exit status, one line and no traceback."""

import os
import signal
import subprocess
import sys
import time

import pytest


def test_other_ranks_write_to_their_log_not_the_terminal(tmp_path):
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "ANONRISK_LOG_DIR": str(tmp_path / "logs")}
    other = subprocess.run([sys.executable, "-m", "anonrisk", "ls", "kinds"], env=env, capture_output=True, text=True)
    assert other.returncode == 0 and other.stdout == "" and other.stderr == "", (other.stdout, other.stderr)
    assert "anonymizers:" in (tmp_path / "logs" / "rank1.log").read_text()
    first = subprocess.run([sys.executable, "-m", "anonrisk", "ls", "kinds"], env={**env, "RANK": "0"}, capture_output=True, text=True)
    assert "anonymizers:" in first.stdout and not (tmp_path / "logs" / "rank0.log").exists()
    bad = subprocess.run([sys.executable, "-m", "anonrisk", "validate", str(tmp_path / "nope.yaml")], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "config file not found" in bad.stderr  # errors still reach the terminal


@pytest.mark.slow  # a short training on 2 shared cores: about 20 s
def test_checkpoint_and_stop_exits_75_without_a_traceback(tmp_path):
    cmd = [sys.executable, "-m", "anonrisk", "train", "configs/quickstart.yaml", f"runs_dir={tmp_path}/runs", f"results_dir={tmp_path}/results",
           "anonymizers=[blur]", "attacks=[contrastive]", "train.backbone=test_resnet", "train.steps=400", "train.checkpoint_every=1000",
           "train.batch_size=16", "train.per_identity=2", "data.synthetic.identities=12", "data.synthetic.images_per_identity=4",
           "progress=false", "tracking.mlflow=false"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        logs = list((tmp_path / "runs" / "train").glob("*/log.jsonl"))
        if logs and logs[0].read_text().count("\n") >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # what the Slurm/torchrun wrappers send before a preemption
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "Traceback" not in err and "anonrisk: training stopped by SIGUSR1 at step" in err and "rerun to resume" in err
    assert "error:" not in err.splitlines()[-1]
    assert list((tmp_path / "runs" / "train").glob("*/checkpoints/*"))
