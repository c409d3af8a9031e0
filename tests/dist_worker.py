"""Worker for tests/test_distributed.py, launched by torchrun or with Slurm's srun variables.

``python tests/dist_worker.py loss OUT``: gathered loss and embedding gradients on this rank's slice.
``python tests/dist_worker.py train OUT``: a few training steps per engine on this rank's slice.
Each rank writes OUT.<rank>.pt. ``train_few_steps`` is also the single-process reference.
"""

import os
import sys

import torch
import torch.nn.functional as F

os.environ.setdefault("DS_ACCELERATOR", "cpu")

GLOBAL_BATCH = 8
LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
ENGINES = {  # name -> attack.* overrides
    "ds-zero2": dict(engine="deepspeed", zero_stage=2),
    "ds-zero2-gradcache": dict(engine="deepspeed", zero_stage=2, grad_cache_chunk=2),
    "torch-ddp-gradcache": dict(engine="torch", grad_cache_chunk=2),
    # the tiled loss (train.loss_tile) through the real training path: 4 rows per rank, 8 columns, tiles of 3
    "torch-ddp-gradcache-tiled": dict(engine="torch", grad_cache_chunk=2, loss_tile=3),
    "ds-zero2-gradcache-tiled": dict(engine="deepspeed", zero_stage=2, grad_cache_chunk=2, loss_tile=3),
}
#: each tiled engine and the untiled one it must equal (the loss is exact; only summation order differs)
TILED_OF = {"torch-ddp-gradcache-tiled": "torch-ddp-gradcache", "ds-zero2-gradcache-tiled": "ds-zero2-gradcache"}


def global_embeddings():
    g = torch.Generator().manual_seed(0)
    return tuple(F.normalize(torch.randn(GLOBAL_BATCH, 6, generator=g), dim=1) for _ in range(2))


def loss_on_slice(rank, world):
    from anonrisk.attack.losses import gathered_contrastive_loss

    a_all, b_all = global_embeddings()
    per = GLOBAL_BATCH // world
    mine = slice(rank * per, (rank + 1) * per)
    out = {}
    for name, labels in (("identity", LABELS[mine]), ("pair", None)):
        a, b = a_all[mine].clone().requires_grad_(), b_all[mine].clone().requires_grad_()
        loss = gathered_contrastive_loss(a, b, 0.1, labels)
        loss.backward()
        out[name] = {"loss": loss.item(), "grad_a": a.grad, "grad_b": b.grad}
    return out


def train_few_steps(overrides, rank=0, world=1, steps=3):
    """Losses (mean over ranks) and exported weights after ``steps`` SGD steps on fixed global batches."""
    import torch.distributed as dist

    from anonrisk.attack.engine import build_engine, contrastive_step
    from anonrisk.config.schema import TrainConfig

    cfg = TrainConfig(backbone="test_convnext", input="rgb+edges", embed_dim=16, batch_size=GLOBAL_BATCH,
                       optimizer="sgd", lr=0.05, learn_temperature=True, **overrides)
    engine, plan = build_engine(cfg, "cpu")
    assert engine.world_size == world, (engine.world_size, world)
    per = GLOBAL_BATCH // world
    mine = slice(rank * per, (rank + 1) * per)
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(100 + step)
        anon, orig = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g), torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)
        loss = contrastive_step(engine, anon[mine], orig[mine], LABELS[mine]).reshape(1)
        if world > 1:
            dist.all_reduce(loss)
        losses.append(loss.item() / world)
        engine.step(0.05)
    return losses, engine.export(), engine.temperature()


def main(mode, out):
    from anonrisk.attack.dist import init_process_group, leave_process_group, read_env

    env = init_process_group(always=True)
    if mode == "loss":
        result = {"env": env.__dict__, "loss": loss_on_slice(env.rank, env.world_size)}
    else:
        result = {name: train_few_steps(o, env.rank, env.world_size) for name, o in ENGINES.items()}
        result["env"] = read_env().__dict__
    torch.save(result, f"{out}.{env.rank}.pt")
    leave_process_group()  # both ranks together: one exiting with the group alive can abort the other


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
