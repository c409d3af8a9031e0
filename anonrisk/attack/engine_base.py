"""The training-engine contract, written once for both engines (``torch_engine.py``: plain PyTorch or
DDP; ``deepspeed_engine.py``: DeepSpeed ZeRO 0-3), and the module every engine trains.

    forward(x) -> (embeddings, temperature)     the wrapped model (DDP / DeepSpeed engine)
    chunk(last)                                  context around one chunk's forward + backward: gradient
                                                 sync only on the step's last chunk (GradCache)
    backward(scalar)                             accumulate parameter gradients
    step(lr)                                     one optimizer step at this learning rate
    save(dir, step) / load(dir) -> step | None   a checkpoint every rank can resume from
    export() -> {name: fp32 tensor}              the Encoder's full weights (a collective under ZeRO-3)
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from anonrisk.attack.gradcache import freeze_batchnorm
from anonrisk.attack.model import Encoder
from anonrisk.attack.train_plan import Plan
from anonrisk.config.schema import TrainConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ContrastiveModel(nn.Module):
    """Encoder plus the (fixed or learnable) log-temperature, so every engine sees one module whose forward
    returns both; under ZeRO-3 the temperature is gathered with the rest of the forward's parameters."""

    def __init__(self, encoder: Encoder, temperature: float, learnable: bool):
        super().__init__()
        self.encoder = encoder
        # shape (1,): DeepSpeed broadcasts parameters as bytes, which a 0-d tensor cannot be viewed as
        self.log_t = nn.Parameter(torch.tensor([math.log(temperature)]), requires_grad=learnable)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x), self.log_t.exp()


def layerwise_optimizer(cfg: TrainConfig, module: nn.Module) -> torch.optim.Optimizer:
    """LARS or LAMB (``train.optimizer``) over the module's trainable parameters, biases, norm weights and
    the log-temperature excluded from adaptation and decay (``optim.param_groups``); either engine steps it."""
    from anonrisk.attack.optim import make_optimizer

    kw = {"momentum": cfg.momentum, "trust_coefficient": cfg.trust_coefficient} if cfg.optimizer == "lars" else {}
    return make_optimizer(cfg.optimizer, module.named_parameters(), cfg.lr, cfg.weight_decay, **kw)


def build_model(cfg: TrainConfig) -> ContrastiveModel:
    torch.manual_seed(cfg.seed)
    return ContrastiveModel(Encoder(cfg.backbone, cfg.embed_dim, cfg.pretrained, cfg.input), cfg.temperature, cfg.learn_temperature)


class Engine:
    """Shared parts of both engines. ``module`` is the unwrapped ContrastiveModel."""

    name = "base"
    module: ContrastiveModel

    def __init__(self, plan: Plan, cfg: TrainConfig):
        self.plan, self.cfg = plan, cfg
        self.device = torch.device(plan.device)
        self.rank, self.world_size = plan.rank, plan.world_size
        self.input_dtype = torch.float32

    def train_mode(self) -> None:
        self.module.train()
        if self.cfg.freeze_bn:
            freeze_batchnorm(self.module)

    def autocast(self):
        return contextlib.nullcontext()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def chunk(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self, lr: float) -> None:
        raise NotImplementedError

    def save(self, ckpt_dir: Path, step: int) -> None:
        raise NotImplementedError

    def load(self, ckpt_dir: Path) -> Optional[int]:
        raise NotImplementedError

    def export(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def temperature(self) -> float:
        return float(self.export_log_t().exp())

    def export_log_t(self) -> torch.Tensor:
        return self.module.log_t.detach().float().cpu()


def fp32(t: torch.Tensor) -> torch.Tensor:
    """Floating tensors as fp32 (bf16 engines export fp32 weights); counters keep their integer type."""
    return t.detach().float() if t.is_floating_point() else t.detach()

