"""Train the contrastive attack with step checkpoints and exact resume, on either engine (``engine.py``).

The stage directory holds ``checkpoints/`` (``last.pt`` for the torch engine; ``last.json`` naming a
DeepSpeed checkpoint tag under ``deepspeed/`` for DeepSpeed), ``log.jsonl`` (global loss per step), the
DeepSpeed config actually used (``deepspeed_config.json``) and, when finished, ``encoder.safetensors`` + DONE.
A SIGTERM/SIGUSR1 (Slurm preemption, a time limit) or SIGINT (Ctrl-C; a second one stops at once) on any
rank writes a checkpoint before exiting; a rerun resumes from the last checkpoint (the previous one when the
last is unreadable) and tolerates a torn last line in the log. Rank 0 holds the stage's lock: a second
launch on the same stage waits, then reuses it. Launch several processes with torchrun, the deepspeed launcher or srun
(docs/training.md): every rank trains on its slice of the same global batch, drawn from (seed, step).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from anonrisk.attack.data import IdentitySampler, PairSource, apply_augment, augment_params
from anonrisk.attack.model import Encoder
from anonrisk.attack.optim import LrSchedule, scale_lr
from anonrisk.config.schema import TrainConfig
from anonrisk.data.records import FaceRecord
from anonrisk.errors import AnonriskError, DataError
from anonrisk.stages import StageDir, atomic_path, names_full_disk, write_json

log = logging.getLogger("anonrisk")

# bump when the trained encoder for the same settings changes (it enters the train fingerprint: anonrisk.plan)
TRAIN_VERSION = 2  # 2: one forward over [anonymized; originals], engines, per-(seed, step, rank) torch seed


class Preempted(AnonriskError):
    """Training stopped on a signal after writing a checkpoint; rerun to resume. The CLI exits with
    ``EXIT_PREEMPTED`` (130 after SIGINT), not 2 (bad input), so a wrapper can tell a requeue from an error."""

    EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, retry

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.exit_code = 130 if signum == signal.SIGINT else self.EXIT_PREEMPTED


def lr_schedule(cfg: TrainConfig) -> LrSchedule:
    """Linear warmup (``train.warmup_steps``, default steps // 20) to the peak, ``train.lr`` scaled with the
    global batch (``train.lr_scaling`` from ``train.lr_base_batch``), then cosine to 0. At the defaults it is
    the schedule of every earlier run, bit for bit (tests/test_large_batch_training.py)."""
    peak = scale_lr(cfg.lr, cfg.batch_size, cfg.lr_base_batch, cfg.lr_scaling)
    warmup = max(1, cfg.steps // 20) if cfg.warmup_steps is None else cfg.warmup_steps
    return LrSchedule(peak, cfg.steps, warmup)


def lr_at(step: int, cfg: TrainConfig) -> float:
    return lr_schedule(cfg)(step)


class StopFlag:
    """Set by SIGTERM/SIGUSR1/SIGINT while training runs (main thread only); previous handlers restored after.
    A second SIGINT interrupts at once (KeyboardInterrupt)."""

    def __init__(self):
        self.set = False
        self.signum = signal.SIGTERM
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set = True
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def step_seed(seed: int, step: int, *more: int) -> int:
    return int(np.random.default_rng([seed, step, *more]).integers(2**62))


# Collectives run on the engine's device: nccl serves cuda tensors only, and a CPU tensor there raises
# "No backend type associated with device type cpu" (tests/test_device_discipline.py).
def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any (a signal reaches ranks at different steps)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _mean_over_ranks(x: torch.Tensor) -> float:
    """The mean of a scalar over ranks, reduced on ``x``'s device (the engine's)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(x)
    t = x.detach().float().reshape(1).clone()
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def train_attack(
    cfg: TrainConfig,
    anonymized: Sequence[FaceRecord],
    originals: Sequence[FaceRecord],
    image_size: int,
    stage: StageDir,
    device: str = "cpu",
    progress: bool = True,
    on_step: Optional[Callable[[int, float, float], None]] = None,
) -> Path:
    """Train (or resume, or reuse) the encoder; returns the path of its weights. Under a multi-process
    launch every rank calls this; rank 0 writes the log, the weights and DONE, and calls ``on_step(step,
    loss, lr)`` after each step (it must be cheap: MLflow's live curve only buffers there)."""
    from anonrisk.attack.dist import barrier
    from anonrisk.attack.engine import build_engine

    weights = stage / "encoder.safetensors"
    if stage.reuse(["encoder.safetensors"]):
        return weights
    engine, plan = build_engine(cfg, device)  # validates the plan: impossible combinations stop here
    main = engine.rank == 0
    # checked before the stage begins: a refused training leaves no directory behind
    pairs = PairSource([r for r in anonymized if r.split == "train"], originals, image_size)
    per_identity = cfg.per_identity if cfg.positives == "identity" else 1
    sampler = IdentitySampler(pairs.identity, cfg.batch_size, cfg.seed, per_identity)
    with stage.lock() if main else contextlib.nullcontext():  # the other ranks wait at the barrier
        barrier()
        if stage.reuse(["encoder.safetensors"]):  # another process finished it while this one waited
            return weights
        with names_full_disk(stage.path):
            return _train(cfg, engine, plan, pairs, sampler, image_size, stage, progress, on_step)


def _log_before(log_path: Path, start: int) -> list[str]:
    """The log's lines of steps before ``start``; a torn line (a kill while writing) is dropped."""
    kept = []
    for line in log_path.read_text().splitlines() if log_path.exists() else []:
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            log.warning("%s: dropped an unreadable line (a kill while writing): %.80r", log_path, line)
            continue
        if step < start:
            kept.append(line)
    return kept


def _train(cfg: TrainConfig, engine, plan, pairs: PairSource, sampler: IdentitySampler, image_size: int, stage: StageDir,
           progress: bool, on_step: Optional[Callable[[int, float, float], None]] = None) -> Path:
    from safetensors.torch import save_file
    from tqdm import tqdm

    from anonrisk.attack.dist import barrier
    from anonrisk.attack.engine import contrastive_step
    from anonrisk.devices import device_name

    weights = stage / "encoder.safetensors"
    rank, per_rank = engine.rank, plan.per_rank_batch
    main = rank == 0
    if main:
        stage.begin({"train": cfg.model_dump(), "image_size": image_size})
        if plan.ds_config:
            write_json(stage / "deepspeed_config.json", plan.ds_config)  # the config DeepSpeed really got
    barrier()

    ckpt_dir = stage / "checkpoints"
    start = engine.load(ckpt_dir) or 0
    log_path = stage / "log.jsonl"
    if main:  # keep the log consistent with the checkpoint: drop entries past the step we resume from
        kept = _log_before(log_path, start)
        with atomic_path(log_path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))

    dev = engine.device
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    t0 = time.perf_counter()
    with StopFlag() as stop, open(log_path, "a") if main else open("/dev/null", "w") as log_file, tqdm(
        total=cfg.steps, initial=start, desc=f"train {stage.fingerprint[-12:]}", disable=None if (progress and main) else True, leave=False
    ) as bar:
        schedule = lr_schedule(cfg)
        for step in range(start, cfg.steps):
            lr = schedule(step)
            torch.manual_seed(step_seed(cfg.seed, step, 2, rank))  # randomness inside the model (drop path)
            idx = sampler(step)  # the global batch; this rank takes its slice
            anon, orig = pairs.batch(idx[mine])  # uint8; made float per chunk by prepare
            sides = None
            if cfg.augment:  # drawn for the whole global batch: an image's augmentation ignores the rank count
                gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, 1))
                sides = [{k: v[mine] for k, v in augment_params(len(idx), gen).items()} for _ in range(2)]

            def prepare(x, rows, side, sides=sides):
                x = Encoder.preprocess(x.to(dev))
                return apply_augment(x, {k: v[rows] for k, v in sides[side].items()}) if sides else x

            labels = torch.as_tensor(pairs.identity[idx[mine]], device=dev) if cfg.positives == "identity" else None
            loss = _mean_over_ranks(contrastive_step(engine, anon, orig, labels, prepare))
            engine.step(lr)
            log_file.write(json.dumps({"step": step, "loss": round(loss, 6), "lr": lr}) + "\n")
            log_file.flush()
            if main and on_step is not None:
                on_step(step, round(loss, 6), lr)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            done = step + 1
            stopping = _any_rank(stop.set, dev)
            if done % cfg.checkpoint_every == 0 or stopping:
                engine.save(ckpt_dir, done)
            if stopping and done < cfg.steps:
                raise Preempted(f"training stopped by {signal.Signals(stop.signum).name} at step {done}; checkpoint saved in "
                                f"{ckpt_dir}: rerun to resume", stop.signum)

    state = engine.export()  # a collective under ZeRO-3: every rank calls it
    temperature = engine.temperature()
    if main:
        with atomic_path(weights) as tmp:
            save_file(state, str(tmp))
        stage.mark_done({"steps": cfg.steps, "resumed_from": start, "seconds": time.perf_counter() - t0, "temperature": temperature,
                         "engine": plan.engine, "device": device_name(dev), "world_size": plan.world_size, "zero_stage": plan.zero_stage,
                         "precision": plan.precision, "grad_cache_chunk": plan.chunk},
                        outputs=["encoder.safetensors"])
    barrier()
    return weights


def load_encoder(cfg: TrainConfig, weights: str | Path, device: str = "cpu") -> Encoder:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model = Encoder(cfg.backbone, cfg.embed_dim, input=cfg.input, pretrained_normalization=cfg.pretrained is not None)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise DataError(f"{weights}: unreadable encoder ({exc}); delete {Path(weights).parent} to train it again") from None
    model.load_state_dict(state)
    return model.to(device).eval()
