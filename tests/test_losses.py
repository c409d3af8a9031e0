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


def test_ranks_simulated_by_slicing_give_the_global_loss_and_gradient():
    """Each rank's rows (its anonymized images against all originals and vice versa), labels global:
    the mean over ranks is the single-process loss of the global batch, gradients included."""
    from anonrisk.attack.losses import local_rows_loss

    g = torch.Generator().manual_seed(2)
    a0, b0 = (F.normalize(torch.randn(12, 6, generator=g), dim=1) for _ in range(2))
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    for lab in (labels, torch.arange(12)):  # multi-positive, and pairs (labels = row index offset by rank)
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        ref = contrastive_loss(a, b, 0.1, lab)
        ga, gb = torch.autograd.grad(ref, (a, b))
        assert abs(ref.item() - naive(a0, b0, 0.1, lab.tolist())) < 1e-5
        world = 3
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        per = 12 // world
        parts = [local_rows_loss(a[r * per:(r + 1) * per], b[r * per:(r + 1) * per], a, b, 0.1, lab[r * per:(r + 1) * per], lab)
                 for r in range(world)]
        total = torch.stack(parts).mean()
        assert abs(total.item() - ref.item()) < 1e-6
        sa, sb = torch.autograd.grad(total, (a, b))
        assert torch.allclose(sa, ga, atol=1e-7) and torch.allclose(sb, gb, atol=1e-7)
        assert abs(parts[0].item() - parts[1].item()) > 1e-4  # the ranks' shares differ: slicing matters


def test_learnable_temperature_gets_a_gradient_and_fixed_one_does_not():
    g = torch.Generator().manual_seed(3)
    a, b = (F.normalize(torch.randn(6, 4, generator=g), dim=1) for _ in range(2))
    log_t = torch.tensor([math.log(0.2)], requires_grad=True)
    loss = contrastive_loss(a, b, log_t.exp())
    (grad,) = torch.autograd.grad(loss, log_t)
    assert grad.abs().item() > 1e-4
    assert abs(loss.item() - pair_infonce(a, b, 0.2).item()) < 1e-6


def test_pair_loss_equals_open_clip_clip_loss():
    """Reference: open_clip's ClipLoss (symmetric InfoNCE, logit scale = 1 / temperature) on the same
    embeddings, loss and gradients, in float64. Tolerance: 1e-10 (loss), 1e-10 (gradients)."""
    from open_clip.loss import ClipLoss

    g = torch.Generator().manual_seed(4)
    ref = ClipLoss()
    for n, t in ((8, 0.07), (33, 0.5), (5, 1.0)):
        a0, b0 = (F.normalize(torch.randn(n, 16, generator=g, dtype=torch.float64), dim=1) for _ in range(2))
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        ours = pair_infonce(a, b, t)
        ga, gb = torch.autograd.grad(ours, (a, b))
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        want = ref(a, b, torch.tensor(1.0 / t, dtype=torch.float64))
        wa, wb = torch.autograd.grad(want, (a, b))
        assert abs(ours.item() - want.item()) < 1e-10
        assert torch.allclose(ga, wa, atol=1e-10) and torch.allclose(gb, wb, atol=1e-10)
