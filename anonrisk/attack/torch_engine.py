"""The plain PyTorch engine: one process, or DistributedDataParallel when a process group has several ranks."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle

import torch

from anonrisk.attack.dist import barrier
from anonrisk.attack.engine_base import DTYPES, ContrastiveModel, Engine, fp32, layerwise_optimizer
from anonrisk.attack.train_plan import LAYERWISE, Plan, fused_adamw
from anonrisk.config.schema import TrainConfig
from anonrisk.errors import DataError
from anonrisk.stages import atomic_path

log = logging.getLogger("anonrisk")
#: newest first: the previous checkpoint is kept, so an unreadable last one costs ``checkpoint_every`` steps
CHECKPOINTS = ("last.pt", "prev.pt")


class TorchEngine(Engine):
    """Plain PyTorch: one process, or DistributedDataParallel when a process group has several ranks.
    bf16/fp16 through autocast (fp16 with a GradScaler, GPU only); channels_last on the GPU."""

    name = "torch"

    def __init__(self, plan: Plan, cfg: TrainConfig, model: ContrastiveModel):
        super().__init__(plan, cfg)
        self.module = model.to(self.device)
        if self.device.type == "cuda":
            self.module = self.module.to(memory_format=torch.channels_last)
        self.train_mode()
        self.wrapped = self.module
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            import inspect

            # buffers (BatchNorm statistics) synced in every forward unless frozen; torch >= 2.14 names it
            # forward_sync_buffers and warns once per rank on broadcast_buffers
            sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters else "broadcast_buffers"
            self.wrapped = DDP(self.module, device_ids=ids, **{sync: not cfg.freeze_bn})
        params = [p for p in self.module.parameters() if p.requires_grad]
        if cfg.optimizer in LAYERWISE:
            self.opt = layerwise_optimizer(cfg, self.module)
        elif cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            fused = {"fused": True} if fused_adamw(self.device) else {}
            self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
        self.scaler = torch.amp.GradScaler("cuda") if plan.precision == "fp16" else None

    def autocast(self):
        if self.plan.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.plan.precision])

    def forward(self, x):
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            return self.wrapped(x)

    def chunk(self, last):
        # DDP decides at forward time whether the coming backward all-reduces: no_sync wraps both
        return self.wrapped.no_sync() if (self.world_size > 1 and not last) else contextlib.nullcontext()

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, lr):
        for g in self.opt.param_groups:
            g["lr"] = lr
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def save(self, ckpt_dir, step):
        if self.rank == 0:  # DDP replicas are identical: one file
            last, prev = (ckpt_dir / name for name in CHECKPOINTS)
            with atomic_path(last) as tmp:
                torch.save({"model": self.module.state_dict(), "opt": self.opt.state_dict(), "step": step,
                            "scaler": self.scaler.state_dict() if self.scaler else None}, tmp)
                if last.exists():  # a kill between the two renames leaves prev.pt: load falls back to it
                    os.replace(last, prev)
        barrier()

    def load(self, ckpt_dir):
        """The newest readable checkpoint's step (None: none yet); an unreadable one is skipped with a warning,
        and when every one is unreadable a DataError names them."""
        unreadable = []
        for path in (ckpt_dir / name for name in CHECKPOINTS):
            if not path.exists():
                continue
            try:
                ckpt = torch.load(path, map_location=self.device, weights_only=True)
            except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:  # truncated or corrupted
                log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, str(exc).splitlines()[0][:200])
                unreadable.append(str(path))
                continue
            self.module.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["opt"])
            if self.scaler and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            return int(ckpt["step"])
        if unreadable:
            raise DataError(f"no readable checkpoint in {ckpt_dir} ({', '.join(unreadable)} unreadable): delete {ckpt_dir} "
                            "to train from the first step")
        return None

    def export(self):
        return {k: fp32(v).cpu().contiguous() for k, v in self.module.encoder.state_dict().items()}

