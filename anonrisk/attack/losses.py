"""Contrastive losses as pure functions of embeddings.

``contrastive_loss``: symmetric InfoNCE between anonymized images ``a`` and originals ``b`` (rows are
unit-norm embeddings). Row i of ``a`` and row i of ``b`` come from the same record. Without labels, that
pair is the only positive (SimCLR/CLIP-style). With identity labels, every original of the same identity is
a positive too (multi-positive, SupCon-style): the attacker knows the identities of its own training set,
and this objective is exactly cross-image re-identification.

Across ranks (``gathered_contrastive_loss``): every rank embeds its slice of the global batch, gathers all
ranks' embeddings *with gradient* and computes only its own rows (its anonymized images against every
original, its originals against every anonymized image), with labels offset by rank. The mean of the ranks'
losses is the single-process loss of the global batch, and so is its gradient once the data-parallel
engine averages gradients across ranks (the gather's backward sums every rank's contribution).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _multi_positive_ce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -mean_{j in positives(i)} log softmax(logits_i)_j."""
    logp = F.log_softmax(logits, dim=1)
    # masked sum rather than logp * positives.float(): no second (N, M) float matrix kept for backward
    return -(logp.masked_fill(~positives, 0.0).sum(1) / positives.sum(1)).mean()


def contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float | torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    labels_b: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Symmetric InfoNCE of (N, D) ``a`` against (M, D) ``b``.

    ``labels`` (N,) and ``labels_b`` (M,) are identity ids; rows and columns with equal ids are positives.
    Without labels, N == M and the positives are the diagonal. ``b`` may hold more rows than ``a`` (all
    ranks' columns, see ``local_rows_loss``), with ``labels_b`` giving their ids.
    """
    logits = a @ b.t() / temperature
    if labels is None:
        target = torch.arange(a.shape[0], device=a.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    labels_b = labels if labels_b is None else labels_b
    pos = labels[:, None] == labels_b[None, :]
    return 0.5 * (_multi_positive_ce(logits, pos) + _multi_positive_ce(logits.t(), pos.t()))


def pair_infonce(a: torch.Tensor, b: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """The paper's objective: each anonymized image's only positive is its own original."""
    return contrastive_loss(a, b, temperature)


def local_rows_loss(
    a_local: torch.Tensor,
    b_local: torch.Tensor,
    a_all: torch.Tensor,
    b_all: torch.Tensor,
    temperature: float | torch.Tensor,
    labels_local: torch.Tensor,
    labels_all: torch.Tensor,
) -> torch.Tensor:
    """One rank's share of the symmetric loss of the global batch: its anonymized rows against every
    original and its original rows against every anonymized image. With equal shares, the mean over ranks
    equals ``contrastive_loss(a_all, b_all, t, labels_all)``."""
    pos = labels_local[:, None] == labels_all[None, :]
    a_to_b = _multi_positive_ce(a_local @ b_all.t() / temperature, pos)
    b_to_a = _multi_positive_ce(b_local @ a_all.t() / temperature, pos)
    return 0.5 * (a_to_b + b_to_a)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the sum, over ranks, of the gradients of its own rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        import torch.distributed as dist

        ctx.group = group
        ctx.rank, ctx.world = dist.get_rank(group), dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":  # reduce_scatter is cheaper; gloo lacks it
            out = torch.empty_like(grad.chunk(ctx.world)[ctx.rank])
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(ctx.world)[ctx.rank].contiguous(), None


def gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's ``x`` (equal shapes) in rank order, keeping the gradient path to each rank's
    own rows. Identity outside a process group or with one rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x
    return _GatherWithGrad.apply(x, group)


def gather_no_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


def gathered_contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float | torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    group=None,
) -> torch.Tensor:
    """This rank's rows of the global-batch loss (see the module doc). ``a``, ``b``: this rank's (n, D)
    embeddings; ``labels``: their identity ids (global ids, comparable across ranks), or None for pairs
    (each row's only positive is its own pair: labels are the global row index, offset by rank)."""
    import torch.distributed as dist

    rank = dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
    if labels is None:
        labels = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]
    a_all, b_all = gather_with_grad(a, group), gather_with_grad(b, group)
    return local_rows_loss(a, b, a_all, b_all, temperature, labels, gather_no_grad(labels, group))
