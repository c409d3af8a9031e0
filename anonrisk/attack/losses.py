"""Contrastive losses as pure functions of embeddings.

``contrastive_loss``: symmetric InfoNCE between anonymized images ``a`` and originals ``b`` (rows are
unit-norm embeddings). Row i of ``a`` and row i of ``b`` come from the same record. Without labels, that
pair is the only positive (SimCLR/CLIP-style). With identity labels, every original of the same identity is
a positive too (multi-positive, SupCon-style): the attacker knows the identities of its own training set,
and this objective is exactly cross-image re-identification.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _multi_positive_ce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -mean_{j in positives(i)} log softmax(logits_i)_j."""
    logp = F.log_softmax(logits, dim=1)
    pos = positives.float()
    return -((logp * pos).sum(1) / pos.sum(1)).mean()


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
    ranks' columns, see ``losses_dist``), with ``labels_b`` giving their ids.
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
