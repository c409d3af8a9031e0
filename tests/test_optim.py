"""LARS and LAMB: a hand-computed step, agreement with timm's independent implementations (float64),
exact resume from state_dict; parameter groups; lr scaling rules and warmup."""

import io
import math

import pytest
import torch
from torch import nn

from anonrisk.attack.optim import LAMB, LARS, LrSchedule, make_optimizer, param_groups, scale_lr


class Net(nn.Module):
    """Weights, biases, a LayerNorm and a (1,)-shaped log-temperature, as the attack's model has."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.norm, self.fc2 = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 4)
        self.log_t = nn.Parameter(torch.tensor([math.log(0.1)]))
        self.double()

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x)))) / self.log_t.exp()


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (16,), generator=g)


def train(model, opt, steps, start=0):
    for s in range(start, start + steps):
        x, y = batch(s)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_param_groups_exclude_biases_norm_weights_and_scalars():
    net = Net()
    net.fc2.weight.requires_grad_(False)
    decay, rest = param_groups(net.named_parameters(), 0.05)
    assert [p.shape for p in decay["params"]] == [net.fc1.weight.shape]  # frozen fc2.weight is left out
    assert (decay["weight_decay"], decay["adapt"], rest["weight_decay"], rest["adapt"]) == (0.05, True, 0.0, False)
    ids = {id(p) for p in rest["params"]}
    assert ids == {id(net.fc1.bias), id(net.norm.weight), id(net.norm.bias), id(net.fc2.bias), id(net.log_t)}


def one_tensor_step(opt_cls, w0, g, **kw):
    w = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = opt_cls([w], **kw)
    w.grad = torch.tensor(g, dtype=torch.float64)
    opt.step()
    return w.detach(), opt


def test_lars_matches_a_hand_computed_step():
    # ||w|| = 5, ||g|| = 1 (orthogonal to w), wd 0.1: local = 0.001 * 5 / (1 + 0.1 * 5) = 1/300, the paper's
    # ratio (not 1/||g + wd w||); d = local * (g + 0.1 w)
    w, opt = one_tensor_step(LARS, [[3.0, 4.0]], [[0.8, -0.6]], lr=2.0, momentum=0.9, weight_decay=0.1, eps=0.0)
    d1 = torch.tensor([[1.1, -0.2]], dtype=torch.float64) / 300
    assert torch.allclose(w, torch.tensor([[3.0, 4.0]], dtype=torch.float64) - 2.0 * d1, atol=1e-15, rtol=0)
    # second step: same gradient, the momentum buffer is 0.9 * d1 + d2
    p = opt.param_groups[0]["params"][0]
    p.grad = torch.tensor([[0.8, -0.6]], dtype=torch.float64)
    w_before = p.detach().clone()
    d2 = 0.001 * w_before.norm() / (1 + 0.1 * w_before.norm()) * (p.grad + 0.1 * w_before)
    opt.step()
    assert torch.allclose(p.detach(), w_before - 2.0 * (0.9 * d1 + d2), atol=1e-15, rtol=0)
    # not adapted (a bias): plain SGD, lr * g
    b, _ = one_tensor_step(LARS, [1.0], [0.5], lr=0.1, momentum=0.9, adapt=False)
    assert torch.allclose(b, torch.tensor([0.95], dtype=torch.float64), atol=1e-15)
    # a zero-initialised weight moves as SGD would (trust ratio 1), not by zero
    z, _ = one_tensor_step(LARS, [0.0, 0.0], [1.0, 2.0], lr=0.1)
    assert torch.allclose(z, torch.tensor([-0.1, -0.2], dtype=torch.float64))


def test_lamb_matches_a_hand_computed_step():
    # step 1 with bias correction: m_hat = g, v_hat = g^2, so u = g / (|g| + eps) + wd * w
    w0, g, wd, eps = [[3.0, -4.0]], [[0.2, 0.5]], 0.01, 1e-6
    w, _ = one_tensor_step(LAMB, w0, g, lr=0.1, weight_decay=wd, eps=eps)
    w0t, gt = torch.tensor(w0, dtype=torch.float64), torch.tensor(g, dtype=torch.float64)
    u = gt / (gt.abs() + eps) + wd * w0t
    assert torch.allclose(w, w0t - 0.1 * (w0t.norm() / u.norm()) * u, atol=1e-15, rtol=0)
    # not adapted, no decay: Adam's first step, lr * sign(g) (up to eps)
    b, _ = one_tensor_step(LAMB, [1.0, 1.0], [0.3, -2.0], lr=0.1, adapt=False, eps=0.0)
    assert torch.allclose(b, torch.tensor([0.9, 1.1], dtype=torch.float64), atol=1e-15)


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_equals_timm_lars(nesterov):
    """timm.optim.Lars (an independent implementation of the same rule; it adapts only groups with weight
    decay, which param_groups' split reproduces): parameters after 8 steps within 1e-13 (float64)."""
    from timm.optim import Lars

    ours, theirs = Net(), Net()
    kw = dict(lr=0.5, momentum=0.9, nesterov=nesterov)
    opt = make_optimizer("lars", ours.named_parameters(), weight_decay=1e-2, trust_coefficient=0.02, **kw)
    ref = Lars([{k: v for k, v in g.items() if k != "adapt"} for g in param_groups(theirs.named_parameters(), 1e-2)],
               trust_coeff=0.02, foreach=False, **kw)
    train(ours, opt, 8)
    train(theirs, ref, 8)
    worst = max((a - b).abs().max().item() for a, b in zip(ours.parameters(), theirs.parameters()))
    assert worst < 1e-13, worst
    assert (ours.fc1.weight - Net().fc1.weight).abs().max() > 1e-4  # the weights did move


def test_lamb_equals_timm_lamb():
    """timm.optim.Lamb without its global gradient clipping (max_grad_norm=None): 8 steps, 1e-13."""
    from timm.optim import Lamb

    ours, theirs = Net(), Net()
    opt = make_optimizer("lamb", ours.named_parameters(), lr=0.01, weight_decay=0.05, betas=(0.9, 0.99), eps=1e-6)
    ref = Lamb([{k: v for k, v in g.items() if k != "adapt"} for g in param_groups(theirs.named_parameters(), 0.05)],
               lr=0.01, betas=(0.9, 0.99), eps=1e-6, max_grad_norm=None, foreach=False)
    train(ours, opt, 8)
    train(theirs, ref, 8)
    worst = max((a - b).abs().max().item() for a, b in zip(ours.parameters(), theirs.parameters()))
    assert worst < 1e-13, worst
    assert (ours.fc1.weight - Net().fc1.weight).abs().max() > 1e-4


@pytest.mark.parametrize("name,kw", [("lars", dict(lr=0.5, momentum=0.9, nesterov=True)), ("lamb", dict(lr=0.01))])
def test_resume_from_state_dict_is_bit_identical(name, kw):
    """6 steps straight vs 3 steps, save model + optimizer (torch.save, loaded with weights_only=True) into
    fresh objects, 3 more steps: identical parameters, bit for bit. Dropping the optimizer state on resume
    (the control) does change them."""
    straight = Net()
    opt = make_optimizer(name, straight.named_parameters(), weight_decay=1e-3, **kw)
    train(straight, opt, 6)

    first = Net()
    opt = make_optimizer(name, first.named_parameters(), weight_decay=1e-3, **kw)
    train(first, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    for keep_state in (True, False):
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
        resumed = Net(seed=123)  # different initial weights: everything must come from the checkpoint
        resumed.load_state_dict(ckpt["model"])
        opt2 = make_optimizer(name, resumed.named_parameters(), weight_decay=1e-3, **kw)
        if keep_state:
            opt2.load_state_dict(ckpt["opt"])
        train(resumed, opt2, 3, start=3)
        same = all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))
        assert same == keep_state, name


def test_lr_scaling_rules():
    assert scale_lr(0.3, 4096, 256, "linear") == pytest.approx(4.8)  # SimCLR: 0.3 x B/256
    assert scale_lr(0.075, 4096, 1, "sqrt") == pytest.approx(4.8)  # SimCLR's square-root rule: 0.075 sqrt(B)
    assert scale_lr(1e-3, 64, 256, "none") == 1e-3
    assert scale_lr(1e-3, 64, 256, "sqrt") == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="'cubic'"):
        scale_lr(0.1, 512, rule="cubic")
    with pytest.raises(ValueError, match="batch_size=0"):
        scale_lr(0.1, 0)


def test_warmup_then_decay():
    s = LrSchedule(peak_lr=1.0, total_steps=110, warmup_steps=10, final_lr=0.1)
    assert [s(i) for i in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert s(10) == pytest.approx(1.0) and s(60) == pytest.approx(0.55) and s(110) == pytest.approx(0.1)
    assert s(500) == pytest.approx(0.1)  # past the end: stays at the final rate
    lin = LrSchedule(2.0, 20, 0, decay="linear")
    assert lin(0) == 2.0 and lin(10) == pytest.approx(1.0) and lin(20) == 0.0
    assert LrSchedule(3.0, 5, 2, decay="constant")(4) == 3.0
    with pytest.raises(ValueError, match="'step'"):
        LrSchedule(1.0, 10, decay="step")
    with pytest.raises(ValueError, match="warmup_steps=20"):
        LrSchedule(1.0, 10, warmup_steps=20)
    with pytest.raises(ValueError, match="'adam'"):
        make_optimizer("adam", Net().named_parameters(), lr=0.1)
