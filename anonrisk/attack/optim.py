"""Large-batch optimisation: LARS and LAMB, learning-rate scaling with the batch, warmup (pure library).

Layer-wise adaptation (LARS, You et al. 2017; LAMB, You et al. 2019) rescales each weight tensor's step by
a trust ratio ``||w|| / ||update||``, so one learning rate suits layers whose gradients differ by orders of
magnitude: what lets SimCLR train at batch 4096+. As is standard, biases, normalisation weights and scalars
(every tensor of one dimension or fewer, and every ``.bias``) get neither adaptation nor weight decay:
``param_groups`` builds the two groups, and each group's ``adapt`` flag says which it is.

The trust ratio needs each tensor's own norms: these optimizers are exact under DDP (gradients are averaged
before ``step``) but not under DeepSpeed ZeRO or its bf16 optimizer, which step flattened partitions
(DeepSpeed issue #490): use them with the torch engine, or DeepSpeed ZeRO stage 0 in fp32.

Learning rates depend on the step number only (``LrSchedule``), so a resumed run recomputes them exactly;
optimizer state lives in ``state_dict`` as for any torch optimizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

LR_SCALING = ("none", "linear", "sqrt")
DECAYS = ("cosine", "linear", "constant")


def is_excluded(name: str, p: torch.Tensor) -> bool:
    """Biases, norm weights, scalars and the log-temperature: no weight decay, no layer-wise adaptation."""
    return p.ndim <= 1 or name.endswith(".bias")


def param_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: weights (decay ``weight_decay``, adapted) and the excluded ones
    (decay 0, not adapted). Empty groups are left out."""
    decay, rest = [], []
    for name, p in named_parameters:
        if p.requires_grad:
            (rest if is_excluded(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "adapt": True},
              {"params": rest, "weight_decay": 0.0, "adapt": False}]
    return [g for g in groups if g["params"]]


def _trust_ratio(w_norm: torch.Tensor, u_norm: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """``ratio`` where both norms are positive, else 1 (a zero-initialised tensor or a zero update moves as
    the plain optimizer would). On the device: no host synchronisation."""
    ok = (w_norm > 0) & (u_norm > 0)
    return torch.where(ok, ratio, torch.ones_like(ratio))


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling.

    For each tensor with ``adapt``: ``local = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps)``
    (the LARS paper's ratio), ``d = local * (g + weight_decay * w)``; otherwise ``d = g + weight_decay * w``.
    Then PyTorch's SGD momentum (``buf = momentum * buf + d``, first step ``buf = d``; Nesterov optional)
    and ``w -= lr * buf``: the learning rate sits outside the momentum, as in ``torch.optim.SGD``.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8, nesterov: bool = False, adapt: bool = True):
        for name, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay),
                        ("trust_coefficient", trust_coefficient), ("eps", eps)):
            if v < 0:
                raise ValueError(f"LARS {name}={v}: must be >= 0")
        if nesterov and momentum <= 0:
            raise ValueError("LARS nesterov=True needs momentum > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps, nesterov=nesterov, adapt=adapt))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, mom = group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                d = g.add(p, alpha=wd) if wd else g.clone()
                if group["adapt"]:
                    w_norm, g_norm = p.norm(), g.norm()
                    ratio = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    d.mul_(_trust_ratio(w_norm, g_norm, ratio))
                if mom:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = d.clone()
                    else:
                        state["momentum_buffer"].mul_(mom).add_(d)
                    buf = state["momentum_buffer"]
                    d = d.add(buf, alpha=mom) if group["nesterov"] else buf
                p.add_(d, alpha=-group["lr"])
        return loss


class LAMB(torch.optim.Optimizer):
    """Adam moments with layer-wise trust ratios (LAMB, bias-corrected as in the paper's Algorithm 2).

    ``m, v``: Adam's moments of ``g``; ``u = m_hat / (sqrt(v_hat) + eps) + weight_decay * w``; with ``adapt``
    ``u *= ||w|| / ||u||``; ``w -= lr * u``. Without adaptation and decay the step is Adam's.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, adapt: bool = True, bias_correction: bool = True):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"LAMB lr={lr}, eps={eps}, weight_decay={weight_decay}: must be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"LAMB betas={betas}: each must be in [0, 1)")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, adapt=adapt,
                                      bias_correction=bias_correction))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                k = state["step"]
                c1, c2 = (1 - b1 ** k, 1 - b2 ** k) if group["bias_correction"] else (1.0, 1.0)
                u = (m / c1).div_((v / c2).sqrt_().add_(group["eps"]))
                if group["weight_decay"]:
                    u.add_(p, alpha=group["weight_decay"])
                if group["adapt"]:
                    w_norm, u_norm = p.norm(), u.norm()
                    u.mul_(_trust_ratio(w_norm, u_norm, w_norm / u_norm))
                p.add_(u, alpha=-group["lr"])
        return loss


def make_optimizer(name: str, named_parameters, lr: float, weight_decay: float = 0.0, **kwargs) -> torch.optim.Optimizer:
    """``lars`` or ``lamb`` over ``param_groups(named_parameters, weight_decay)``; ``kwargs`` go to the
    optimizer (momentum, trust_coefficient, betas, eps, ...)."""
    groups = param_groups(named_parameters, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, weight_decay=weight_decay, **kwargs)
    if name == "lamb":
        return LAMB(groups, lr=lr, weight_decay=weight_decay, **kwargs)
    raise ValueError(f"optimizer {name!r}: expected 'lars' or 'lamb'")


def scale_lr(base_lr: float, batch_size: int, base_batch_size: int = 256, rule: str = "linear") -> float:
    """The learning rate for ``batch_size`` from one tuned at ``base_batch_size``: ``linear``
    (Goyal et al. 2017: lr x B / B0, SimCLR with SGD/LARS), ``sqrt`` (lr x sqrt(B / B0), for LAMB/Adam and
    SimCLR's small-epoch runs) or ``none``."""
    if rule not in LR_SCALING:
        raise ValueError(f"lr scaling rule {rule!r}: expected one of {', '.join(LR_SCALING)}")
    if batch_size < 1 or base_batch_size < 1:
        raise ValueError(f"batch_size={batch_size}, base_batch_size={base_batch_size}: must be >= 1")
    ratio = batch_size / base_batch_size
    return base_lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


@dataclass(frozen=True)
class LrSchedule:
    """Linear warmup over ``warmup_steps`` (step s gets ``peak_lr * (s + 1) / warmup_steps``, so step 0 is
    not wasted), then ``decay`` from ``peak_lr`` to ``final_lr`` at ``total_steps``: cosine, linear or
    constant. A pure function of the step: resuming at step s gives the same rate."""

    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    final_lr: float = 0.0
    decay: str = "cosine"

    def __post_init__(self):
        if self.decay not in DECAYS:
            raise ValueError(f"lr decay {self.decay!r}: expected one of {', '.join(DECAYS)}")
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps}, total_steps={self.total_steps}: "
                             "need 0 <= warmup_steps <= total_steps and total_steps >= 1")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return self.peak_lr
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1.0 - progress
        return self.final_lr + (self.peak_lr - self.final_lr) * shape
