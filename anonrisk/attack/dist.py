"""Process-group set-up from whatever launched us: torchrun, the deepspeed launcher, or Slurm ``srun``.

torchrun and the deepspeed launcher export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
``srun`` exports SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_NODELIST instead: the master is the
first host of the node list (or MASTER_ADDR when given) and the port is derived from the job id (or
MASTER_PORT). Anything else is one process (rank 0 of 1).
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping, Optional

from anonrisk.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"  # torchrun | slurm | none

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """First hostname of a Slurm node list: ``gpu[003-005,9],cpu1`` -> ``gpu003``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ConfigError(f"SLURM_NODELIST={nodelist!r}: cannot read a host name from it")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def read_env(env: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Where this process sits in the job, from the launcher's environment variables."""
    env = os.environ if env is None else env
    try:
        if "WORLD_SIZE" in env and "RANK" in env:
            return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                           env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
        if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
            addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST", "127.0.0.1"))
            port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000)
            return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), addr, port, "slurm")
    except ValueError as exc:
        raise ConfigError(f"launcher environment: {exc}") from None
    return DistEnv()


def local_gpu_index(local_rank: int, visible: Optional[int] = None) -> int:
    """Which of the GPUs this process sees is its own (``visible``: how many it sees, default
    ``torch.cuda.device_count()``). ``srun --gpus-per-task=1`` (or a binding launcher) shows each task only
    its own GPU, as index 0, whatever its local rank; ``--gpus-per-node=8`` with 8 tasks shows every task all
    eight, and local rank r takes GPU r."""
    if visible is None:
        import torch

        visible = torch.cuda.device_count()
    if visible == 1:
        return 0
    if not 0 <= local_rank < visible:
        raise ConfigError(f"local rank {local_rank} sees {visible} GPU(s): launch at most one task per GPU on a node "
                          "(--ntasks-per-node <= --gpus-per-node, or --gpus-per-task=1)")
    return local_rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(backend: Optional[str] = None, env: Optional[DistEnv] = None, always: bool = False) -> DistEnv:
    """Initialise torch.distributed for this job (once; an existing group is reused). One process gets no
    group unless ``always`` (DeepSpeed needs one even alone: a loopback group of one on a free port).
    Backend: nccl with CUDA, gloo otherwise."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), launcher="existing")
    env = env or read_env()
    if env.world_size == 1 and not always:
        return env
    if env.world_size == 1:  # a group of one needs no rendezvous: a free loopback port, whatever was inherited
        env = DistEnv(master_port=free_port())
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    # DeepSpeed and torch read these; set them for srun too so both agree with us
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    bound = {}
    if backend == "nccl":
        gpu = local_gpu_index(env.local_rank)
        torch.cuda.set_device(gpu)
        # bound to this rank's GPU: barriers and object collectives use it instead of guessing a device
        bound["device_id"] = torch.device("cuda", gpu)
    dist.init_process_group(backend, init_method=f"tcp://{env.master_addr}:{env.master_port}", rank=env.rank,
                            world_size=env.world_size, **bound)
    return env


def world() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """All ranks wait here. It runs on the group's device: nccl groups are bound to the rank's GPU at
    ``init_process_group``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def leave_process_group() -> None:
    """Every rank leaves together before its process exits: a rank that exits with the group alive while
    another still talks to it can abort ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()
