"""Killing a training process at a known point, for the resume tests."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


def sigkill_at_first_checkpoint(cmd: list[str], env: dict, runs_dir: Path, timeout: float) -> Path:
    """Run ``cmd``, SIGKILL it as soon as a train stage under ``runs_dir`` has ``checkpoints/last.pt``;
    returns that stage's directory (asserted unfinished)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, deadline = None, time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        found = list((runs_dir / "train").glob("*/checkpoints/last.pt"))
        if found:
            ckpt = found[0]
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt is not None, "no checkpoint appeared"
    stage = ckpt.parent.parent
    assert not (stage / "DONE").exists()
    return stage
