import math

import torch
import torch.nn.functional as F

from anonrisk.attack.losses import contrastive_loss, pair_infonce


def naive(a, b, t, labels):
    """Loop-by-loop reference: -mean over positives of log softmax, both directions."""
    def one_side(x, y, lx, ly):
        total = 0.0
        for i in range(len(x)):
            logits = [float(x[i] @ y[j]) / t for j in range(len(y))]
            lse = math.log(sum(math.exp(v) for v in logits))
            pos = [j for j in range(len(y)) if lx[i] == ly[j]]
            total += -sum(logits[j] - lse for j in pos) / len(pos)
        return total / len(x)
    return 0.5 * (one_side(a, b, labels, labels) + one_side(b, a, labels, labels))


def test_pair_loss_equals_naive_reference():
    g = torch.Generator().manual_seed(0)
    a, b = (F.normalize(torch.randn(6, 4, generator=g), dim=1) for _ in range(2))
    assert abs(pair_infonce(a, b, 0.2).item() - naive(a, b, 0.2, list(range(6)))) < 1e-5


def test_multi_positive_loss_equals_naive_reference_and_reduces_to_pairs():
    g = torch.Generator().manual_seed(1)
    a, b = (F.normalize(torch.randn(8, 5, generator=g), dim=1) for _ in range(2))
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert abs(contrastive_loss(a, b, 0.1, labels).item() - naive(a, b, 0.1, labels.tolist())) < 1e-5
    unique = torch.arange(8)
    assert torch.allclose(contrastive_loss(a, b, 0.1, unique), pair_infonce(a, b, 0.1))
