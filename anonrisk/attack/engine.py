"""Training engines for this process: ``build_engine`` sets up the process group the launcher asked for,
checks the plan (``train_plan.validate_plan``) and builds the model and the engine (``torch_engine.py`` or
``deepspeed_engine.py``, both behind the contract in ``engine_base.py``). An engine owns the model's
distribution, precision, backward, optimizer step and checkpoints; ``contrastive_step`` (gathered loss,
untiled or tiled (``train.loss_tile``), optional GradCache) is written once against the contract.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from anonrisk.attack.dist import init_process_group, local_gpu_index, world
from anonrisk.attack.engine_base import Engine, build_model
from anonrisk.attack.gradcache import full_batch_step, grad_cache_step, has_batchnorm
from anonrisk.attack.losses import gathered_contrastive_loss
from anonrisk.attack.tiled import tiled_gathered_loss
from anonrisk.attack.train_plan import Plan, validate_plan
from anonrisk.config.schema import TrainConfig

log = logging.getLogger("anonrisk")


def build_engine(cfg: TrainConfig, device: str) -> tuple[Engine, Plan]:
    """Set up the process group the launcher asked for, validate the plan, build the model and engine."""
    env = init_process_group(always=cfg.engine == "deepspeed")
    rank, world_size = world()
    if torch.device(device).type == "cuda" and world_size > 1:
        device = f"cuda:{local_gpu_index(env.local_rank)}"  # cuda:0 when Slurm shows each task one GPU
    plan = validate_plan(cfg, device, world_size, rank)
    model = build_model(cfg)
    if (cfg.grad_cache_chunk is not None) and has_batchnorm(model) and not cfg.freeze_bn:
        log.warning("train.grad_cache_chunk with BatchNorm in %s: statistics are per chunk, not per batch "
                    "(set train.freeze_bn=true for exact GradCache)", cfg.backbone)
    if cfg.engine == "deepspeed":
        from anonrisk.attack.deepspeed_engine import DeepSpeedEngine as engine_cls
    else:
        from anonrisk.attack.torch_engine import TorchEngine as engine_cls
    engine = engine_cls(plan, cfg, model)
    return engine, plan


def contrastive_step(engine: Engine, anon: torch.Tensor, orig: torch.Tensor, labels: Optional[torch.Tensor],
                     prepare: Optional[Callable[[torch.Tensor, slice, int], torch.Tensor]] = None) -> torch.Tensor:
    """Backward of one contrastive step on this rank's share (``anon``, ``orig``: (n, ...) images;
    ``labels``: global identity ids or None for pairs). Returns this rank's loss; the mean over ranks is the
    global-batch loss. The caller runs ``engine.step(lr)``.

    ``prepare(images, rows, side)`` turns rows ``rows`` of one side (0 anonymized, 1 original) into the
    model's float input on the engine's device; it runs per GradCache chunk (twice: embedding pass and
    re-run), so a batch of 32,768 uint8 pairs never exists as one float tensor. Default: the images as given.
    """
    n = anon.shape[0]
    chunk = engine.plan.chunk or n
    prepare = prepare or (lambda x, rows, side: x)

    tile = engine.cfg.loss_tile
    # the tiled loss's matmuls: fp32 in an fp32 run; in a bf16/fp16 run bf16 with fp32 accumulation on CUDA
    # (tiled.default: the input dtype elsewhere)
    compute_dtype = torch.float32 if engine.plan.precision == "fp32" else None

    def loss_fn(embs: list[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        a = [e[: e.shape[0] // 2] for e in embs]
        b = [e[e.shape[0] // 2:] for e in embs]
        if tile is not None:  # the chunks' halves as row blocks: never concatenated on one rank
            return tiled_gathered_loss(a, b, t.float(), labels, tile=tile, compute_dtype=compute_dtype)
        return gathered_contrastive_loss(torch.cat(a), torch.cat(b), t.float(), labels)

    def make(rows: slice):
        return lambda: torch.cat([prepare(anon[rows], rows, 0), prepare(orig[rows], rows, 1)])

    inputs = [make(slice(i, i + chunk)) for i in range(0, n, chunk)]
    if len(inputs) == 1:
        return full_batch_step(engine.forward, inputs[0], loss_fn, engine.backward, engine.chunk)
    return grad_cache_step(engine.forward, inputs, loss_fn, engine.backward, engine.chunk)
