"""Output under a multi-process launch (torchrun, the deepspeed launcher): rank 0 talks, every other rank
writes its output and logs to ``<ANONRISK_LOG_DIR or ./logs>/rank<N>.log`` and sends only its warnings and
errors to the terminal, prefixed ``[rank N]``, so each line appears once and not once per rank."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

FORMAT = "%(levelname)s %(name)s: %(message)s"


def launch_rank() -> tuple[int, int]:
    """(rank, world size) as torchrun and the deepspeed launcher export them; (0, 1) otherwise (a Slurm job's
    tasks already write per-task logs through submitit)."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def quiet_other_ranks(level: int = logging.INFO) -> Optional[Path]:
    """On a rank other than 0 of several: stdout and logging into the rank's log file; warnings to stderr.
    Returns the log file, or None on rank 0 / a single process."""
    rank, world = launch_rank()
    if world <= 1 or rank == 0:
        return None
    path = Path(os.environ.get("ANONRISK_LOG_DIR", "logs")) / f"rank{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    out = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    sys.stdout = out
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    to_file = logging.StreamHandler(out)
    to_file.setFormatter(logging.Formatter("%(asctime)s " + FORMAT))
    to_terminal = logging.StreamHandler(sys.stderr)
    to_terminal.setLevel(logging.WARNING)
    to_terminal.setFormatter(logging.Formatter(f"[rank {rank}] " + FORMAT))
    root.addHandler(to_file)
    root.addHandler(to_terminal)
    root.setLevel(level)
    return path
