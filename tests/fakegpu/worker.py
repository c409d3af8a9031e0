"""One rank of tests/test_device_discipline.py: ``python -m fakegpu.worker RANK WORLD PORT DIR``.

Trains the contrastive attack with ``train_attack`` on the ``fakegpu`` device inside a process group that
serves only that device (see ``fakegpu/__init__.py``); writes DIR/served.<rank>.json with the collectives
the group served."""

import json
import sys
from pathlib import Path

import torch


def main(rank: int, world: int, port: int, root: Path) -> None:
    torch.set_num_threads(1)
    import fakegpu
    from fakegpu.case import IMAGE_SIZE, attack_config, pairs

    fakegpu.init_group(rank, world, port)
    from anonrisk.attack.train import train_attack
    from anonrisk.stages import StageDir

    anon, orig = pairs(root)
    train_attack(attack_config(), anon, orig, IMAGE_SIZE, StageDir(str(root / "runs"), "train", "fakegpu"), device=fakegpu.DEVICE,
                 progress=False)
    served = dict(fakegpu.SERVED)
    served["nccl_backward_ok"] = nccl_branch_of_the_gather_backward(rank, world)
    (root / f"served.{rank}.json").write_text(json.dumps(served))
    from anonrisk.attack.dist import leave_process_group

    leave_process_group()


def nccl_branch_of_the_gather_backward(rank: int, world: int) -> bool:
    """gather_with_grad's backward reduce-scatters on nccl (gloo all-reduces); run that branch here too."""
    import torch.distributed as dist

    import fakegpu
    from anonrisk.attack.losses import gather_with_grad

    x = torch.ones(2, 3, device=fakegpu.DEVICE, requires_grad=True)
    weights = torch.arange(2 * world * 3, dtype=torch.float32).reshape(2 * world, 3)
    real = dist.get_backend
    dist.get_backend = lambda group=None: "nccl"
    try:
        (gather_with_grad(x) * weights.to(fakegpu.DEVICE)).sum().backward()
    finally:
        dist.get_backend = real
    # every rank's upstream gradient is `weights`: the sum over ranks of this rank's rows
    return fakegpu.SERVED["reduce_scatter_tensor"] == 1 and torch.equal(x.grad.cpu(), world * weights[2 * rank:2 * rank + 2])


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
