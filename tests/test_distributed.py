"""Real multi-process runs on 127.0.0.1 (gloo): torchrun and Slurm srun variables, the gathered loss, and
two ranks with DeepSpeed ZeRO-2 (and DDP) matching one process with the global batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anonrisk.attack.dist import first_host, read_env

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import dist_worker  # noqa: E402

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env():
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(HERE.parent)}


def test_launcher_environment_is_read_from_torchrun_and_slurm_variables():
    assert read_env({}).world_size == 1
    e = read_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == (3, 8, 1, "n1", 1234, "torchrun")
    s = read_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODELIST": "gpu[003-004,9]", "SLURM_JOB_ID": "4242"})
    assert (s.rank, s.world_size, s.local_rank, s.master_addr, s.master_port, s.launcher) == (5, 8, 1, "gpu003", 24242, "slurm")
    assert read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).world_size == 1  # one task (a submitit job): no group
    assert first_host("cpu1,cpu2") == "cpu1" and first_host("a[10-12]") == "a10"


@pytest.mark.slow
def test_gathered_loss_across_two_slurm_ranks_equals_the_global_loss(tmp_path):
    """Two processes started with srun's variables (SLURM_PROCID/NTASKS/LOCALID/NODELIST): a real gloo
    all_gather with gradient; each rank's loss and embedding gradients against the single-process ones."""
    from anonrisk.attack.losses import contrastive_loss

    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(HERE / "dist_worker.py"), "loss", str(tmp_path / "out")],
                              env={**clean_env(), "SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
                                   "SLURM_NODELIST": "127.0.0.1", "MASTER_PORT": port}, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()[-3000:]
    outs = [torch.load(tmp_path / f"out.{r}.pt", weights_only=False) for r in range(2)]
    assert [o["env"]["launcher"] for o in outs] == ["slurm", "slurm"] and outs[1]["env"]["rank"] == 1
    a0, b0 = dist_worker.global_embeddings()
    for name, labels in (("identity", dist_worker.LABELS), ("pair", None)):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        ref = contrastive_loss(a, b, 0.1, labels)
        ga, gb = torch.autograd.grad(ref, (a, b))
        mean = (outs[0]["loss"][name]["loss"] + outs[1]["loss"][name]["loss"]) / 2
        assert abs(mean - ref.item()) < 1e-6, (name, mean, ref.item())
        # each rank's gradient (summed over ranks by the gather's backward) / world = the global gradient
        got_a = torch.cat([o["loss"][name]["grad_a"] for o in outs]) / 2
        got_b = torch.cat([o["loss"][name]["grad_b"] for o in outs]) / 2
        assert torch.allclose(got_a, ga, atol=1e-6) and torch.allclose(got_b, gb, atol=1e-6), name


@pytest.mark.slow
def test_two_ranks_match_one_process_with_the_global_batch(tmp_path, dist_group):
    """torchrun --nproc_per_node 2: DeepSpeed ZeRO-2 (plain and with GradCache) and DDP with GradCache give
    the same losses and weights as one process with the whole batch (fp32, SGD, learnable temperature); so do
    both with the tiled loss (train.loss_tile: each rank's rows against every column, in ragged tiles), whose
    single process in turn equals the untiled one."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(HERE / "dist_worker.py"), "train", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    outs = [torch.load(tmp_path / f"out.{r}.pt", weights_only=False) for r in range(2)]
    assert outs[0]["env"]["launcher"] == "torchrun" and outs[0]["env"]["world_size"] == 2
    refs = {}
    for name, overrides in dist_worker.ENGINES.items():
        ref_losses, ref_w, ref_t = refs[name] = dist_worker.train_few_steps(overrides)
        if name in dist_worker.TILED_OF:
            untiled_losses, untiled_w, _ = refs[dist_worker.TILED_OF[name]]
            assert max(abs(x - y) for x, y in zip(ref_losses, untiled_losses)) < 1e-6, (name, ref_losses, untiled_losses)
            assert max((ref_w[k] - untiled_w[k]).abs().max().item() for k in ref_w) < 1e-5, name
        for r in range(2):
            losses, w, t = outs[r][name]
            assert max(abs(x - y) for x, y in zip(losses, ref_losses)) < 1e-5, (name, losses, ref_losses)
            worst = max((w[k] - ref_w[k]).abs().max().item() for k in ref_w)
            assert worst < 1e-5, (name, r, worst)
            assert abs(t - ref_t) < 1e-6 and abs(ref_t - 0.1) > 1e-4  # the learnable temperature moved, equally
        assert ref_losses[-1] != ref_losses[0]
