"""Every collective of training runs on the engine's device.

On a GPU cluster the process group is nccl, which serves cuda tensors only: one collective on a CPU tensor
raises "No backend type associated with device type cpu" at step 0. Here two ranks train on ``fakegpu``
(tests/fakegpu: a real non-CPU device type computing in host memory) inside a process group whose only
backend is registered for that device, so any CPU tensor handed to a collective fails the same way. The
ranks must then reproduce a one-process CPU run of the same global batch: per-step loss within 1e-5,
every weight within 1e-5 (SGD; measured 8.5e-7).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fakegpu_built():
    import fakegpu

    fakegpu.build()  # once here, so the ranks only load it


def test_each_rank_picks_a_gpu_it_can_see():
    """--gpus-per-node=8 with 8 tasks: every task sees 8 GPUs and takes its local rank; --gpus-per-task=1:
    every task sees only its own, as device 0 (tests/cluster/test_gpu_shape.py shows Slurm doing both)."""
    from anonrisk.attack.dist import local_gpu_index
    from anonrisk.errors import ConfigError

    assert [local_gpu_index(r, 8) for r in range(8)] == list(range(8))
    assert [local_gpu_index(r, 1) for r in range(4)] == [0, 0, 0, 0]
    with pytest.raises(ConfigError, match="local rank 4 sees 4 GPU"):
        local_gpu_index(4, 4)


@pytest.mark.slow
def test_a_cpu_collective_is_refused_like_nccl_refuses_it(fakegpu_built, tmp_path):
    """The simulation itself: the group serves fakegpu tensors and refuses CPU ones with nccl's message."""
    code = (
        "import sys, torch, torch.distributed as dist, fakegpu\n"
        "fakegpu.init_group(0, 1, int(sys.argv[1]))\n"
        "t = torch.ones(2, device='fakegpu'); dist.all_reduce(t); assert t.device.type == 'fakegpu'\n"
        "try:\n    dist.all_reduce(torch.ones(1))\nexcept RuntimeError as e:\n    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(_free_port())], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{HERE.parent}"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "refused: No backend type associated with device type cpu" in out.stdout


@pytest.mark.slow
def test_two_ranks_on_an_accelerator_only_group_match_one_cpu_process(fakegpu_built, tmp_path):
    import torch
    from safetensors.torch import load_file

    from anonrisk.attack.train import train_attack
    from anonrisk.stages import StageDir
    from fakegpu.case import IMAGE_SIZE, attack_config, pairs

    anon, orig = pairs(tmp_path)  # written once, before the ranks read them
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{HERE}{os.pathsep}{HERE.parent}")
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "fakegpu.worker", str(r), "2", port, str(tmp_path)], env=env,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-4000:]
    served = [json.loads((tmp_path / f"served.{r}.json").read_text()) for r in range(2)]
    cfg = attack_config()
    for s in served:  # the loop's own collectives ran on the group: loss mean and stop flag each step, the gathers
        assert s["allreduce"] >= 2 * cfg.steps and s["allgather"] >= 3 * cfg.steps, s
        assert s["nccl_backward_ok"], s  # and the reduce-scatter branch nccl takes in the gather's backward

    ref = StageDir(str(tmp_path / "ref"), "train", "cpu")
    torch.manual_seed(0)
    train_attack(cfg, anon, orig, IMAGE_SIZE, ref, device="cpu", progress=False)
    got = StageDir(str(tmp_path / "runs"), "train", "fakegpu")
    losses = [json.loads(line)["loss"] for line in (got / "log.jsonl").read_text().splitlines()]
    ref_losses = [json.loads(line)["loss"] for line in (ref / "log.jsonl").read_text().splitlines()]
    assert len(losses) == cfg.steps and max(abs(a - b) for a, b in zip(losses, ref_losses)) < 1e-5, (losses, ref_losses)
    w, w_ref = load_file(str(got / "encoder.safetensors")), load_file(str(ref / "encoder.safetensors"))
    worst = max((w[k].float() - w_ref[k].float()).abs().max().item() for k in w_ref)
    assert worst < 1e-5, worst
