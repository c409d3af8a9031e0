"""Worker for tests/test_tiled_loss.py: ``python tests/tiled_dist_worker.py OUT`` under RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT. Each rank takes its slice of fixed float64 global embeddings, computes
``tiled_gathered_loss`` (real gloo all_gather with gradient) for pairs and identities, and writes its loss
and the gradients of its slice and of a learnable temperature to OUT.<rank>.pt."""

import sys

import torch
import torch.nn.functional as F

GLOBAL_BATCH = 12
TILE = 4  # ragged against the 6 rows per rank and the 12 columns
LABELS = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4, 5])  # 1 to 4 images per identity, across ranks


def global_embeddings():
    g = torch.Generator().manual_seed(0)
    return tuple(F.normalize(torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64), dim=1) for _ in range(2))


def main(out):
    from anonrisk.attack.dist import init_process_group, leave_process_group
    from anonrisk.attack.tiled import tiled_gathered_loss

    env = init_process_group(always=True)
    per = GLOBAL_BATCH // env.world_size
    mine = slice(env.rank * per, (env.rank + 1) * per)
    a_all, b_all = global_embeddings()
    result = {"rank": env.rank, "world": env.world_size}
    for name, labels in (("identity", LABELS[mine]), ("pair", None)):
        a, b = a_all[mine].clone().requires_grad_(), b_all[mine].clone().requires_grad_()
        t = torch.tensor([0.1], dtype=torch.float64, requires_grad=True)
        loss = tiled_gathered_loss(a, b, t, labels, tile=TILE)
        loss.backward()
        result[name] = {"loss": loss.item(), "grad_a": a.grad, "grad_b": b.grad, "grad_t": t.grad}
    torch.save(result, f"{out}.{env.rank}.pt")
    leave_process_group()  # both ranks together: one exiting with the group alive can abort the other


if __name__ == "__main__":
    main(sys.argv[1])
