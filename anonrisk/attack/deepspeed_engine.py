"""The DeepSpeed engine (ZeRO 0-3) and the weights-only loading of its checkpoints."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from typing import Optional

import torch

from anonrisk.attack.dist import barrier
from anonrisk.attack.engine_base import ContrastiveModel, Engine, fp32, layerwise_optimizer
from anonrisk.attack.train_plan import LAYERWISE, Plan
from anonrisk.config.schema import TrainConfig
from anonrisk.errors import ConfigError
from anonrisk.stages import write_json


class DeepSpeedEngine(Engine):
    """DeepSpeed's engine (ZeRO 0-3, fp32/bf16/fp16) built from the resolved config in ``plan.ds_config``.

    GradCache chunks: at ZeRO 0/1 the engine is told that every backward but the last is inside an
    accumulation step (``set_gradient_accumulation_boundary``); at ZeRO 2/3 the chunk backward passes run
    inside ``coalesce_grad_reduction()``. Either way gradients are reduced once, after the last chunk.
    Checkpoints: ``engine.save_checkpoint`` per tag ``step<N>``, then an atomic ``last.json`` names the tag
    (a kill mid-save leaves the previous one in force); loading reads DeepSpeed's files with
    ``torch.load(weights_only=True)`` and an allow-list of DeepSpeed's own classes.
    """

    name = "deepspeed"

    def __init__(self, plan: Plan, cfg: TrainConfig, model: ContrastiveModel):
        super().__init__(plan, cfg)
        import deepspeed

        params = [p for p in model.parameters() if p.requires_grad]
        logging.getLogger("anonrisk").info("DeepSpeed: initializing (the first use on a machine builds its C++/CUDA ops: "
                                           "about 2 minutes without output; later runs load them from the cache)")
        # LARS/LAMB: our own optimizer instance (the plan allows it at ZeRO 0 in fp32 only, where DeepSpeed
        # steps it on the real tensors); otherwise DeepSpeed builds the config's torch AdamW/SGD
        client = layerwise_optimizer(cfg, model) if cfg.optimizer in LAYERWISE else None
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=client, model_parameters=params, config=dict(plan.ds_config))
        self.module = self.ds.module
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.precision, torch.float32)
        self.ds.checkpoint_engine = _weights_only_checkpoint_engine(self.ds.checkpoint_engine)
        if plan.chunk is not None and plan.zero_stage >= 2 and not hasattr(self.ds.optimizer, "_coalesce_grad_reduction"):
            raise ConfigError(
                f"train.grad_cache_chunk with ZeRO stage {plan.zero_stage}: DeepSpeed's "
                f"{type(self.ds.optimizer).__name__} cannot defer gradient reduction across chunks; "
                "use train.zero_stage=0 or 1, or drop train.grad_cache_chunk"
            )
        self._coalesce: Optional[contextlib.ExitStack] = None
        self.train_mode()

    def forward(self, x):
        return self.ds(x.to(self.input_dtype))

    @contextlib.contextmanager
    def chunk(self, last):
        if self.plan.chunks == 1:
            yield
            return
        if self.plan.zero_stage >= 2:
            if self._coalesce is None:  # opened by the first chunk of a step, closed after the last
                self._coalesce = contextlib.ExitStack()
                self._coalesce.enter_context(self.ds.coalesce_grad_reduction())
        else:  # stages 0/1 reduce only at the accumulation boundary
            self.ds.set_gradient_accumulation_boundary(last)
        yield
        if last and self._coalesce is not None:
            self._coalesce.close()  # the one gradient reduction of this step
            self._coalesce = None

    def backward(self, loss):
        self.ds.backward(loss, scale_wrt_gas=False)

    def step(self, lr):
        for g in self.ds.optimizer.param_groups:
            g["lr"] = lr
        self.ds.step()

    def save(self, ckpt_dir, step):
        ds_dir = ckpt_dir / "deepspeed"
        tag = f"step{step:09d}"
        self.ds.save_checkpoint(str(ds_dir), tag=tag, client_state={"anonrisk_step": step}, save_latest=False)
        barrier()
        if self.rank == 0:
            write_json(ckpt_dir / "last.json", {"tag": tag, "step": step})
            for old in ds_dir.iterdir():  # keep only the checkpoint last.json names
                if old.is_dir() and old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()

    def load(self, ckpt_dir):
        pointer = ckpt_dir / "last.json"
        if not pointer.exists():
            return None
        try:
            tag = json.loads(pointer.read_text())["tag"]
            path, client = self.ds.load_checkpoint(str(ckpt_dir / "deepspeed"), tag=tag)
        except (ValueError, KeyError, RuntimeError, EOFError, OSError) as exc:  # a truncated pointer or shard
            raise ConfigError(f"checkpoint {ckpt_dir / 'deepspeed'} could not be loaded ({str(exc).splitlines()[0][:200]}); "
                              f"delete {ckpt_dir} to train from the first step") from None
        if path is None:
            raise ConfigError(f"checkpoint {ckpt_dir / 'deepspeed' / tag} could not be loaded; delete {pointer} to start over")
        return int(client["anonrisk_step"])

    def _full_params(self) -> dict[str, torch.Tensor]:
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self.module.named_parameters():
            full = safe_get_full_fp32_param(p) if p.requires_grad else None  # the fp32 master copy
            if full is None:
                with deepspeed.zero.GatheredParameters([p]):
                    full = p.detach().clone()
            out[name] = full.float().cpu()
        for name, b in self.module.named_buffers():
            out[name] = fp32(b).cpu()
        return out

    def export(self):
        full = self._full_params()
        return {k[len("encoder."):]: v.contiguous() for k, v in full.items() if k.startswith("encoder.")}

    def export_log_t(self):
        return self._full_params()["log_t"]



def _weights_only_checkpoint_engine(base):
    """DeepSpeed's torch checkpoint engine loads with ``weights_only=False``; this one loads the same files
    with ``weights_only=True``, allowing only the few DeepSpeed classes its files hold."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(base) is not TorchCheckpointEngine:
        return base  # another configured engine: leave it alone

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    base.__class__ = WeightsOnlyCheckpointEngine
    return base


def _deepspeed_safe_globals() -> list:
    # what DeepSpeed 0.19's ZeRO 0-3 fp32/bf16 checkpoints hold besides tensors and containers (listed with
    # torch.serialization.get_unsafe_globals_in_checkpoint); all plain data classes
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]

