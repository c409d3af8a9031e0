"""Train the contrastive attack (plain PyTorch engine) with step checkpoints and exact resume.

The stage directory holds ``checkpoints/last.pt`` (model, optimizer, step), ``log.jsonl`` (loss per step)
and, when finished, ``encoder.safetensors`` + DONE. A SIGTERM/SIGUSR1 (Slurm preemption, a time limit)
writes a checkpoint before exiting; a rerun resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from anonrisk.attack.data import IdentitySampler, PairSource, augment
from anonrisk.attack.losses import contrastive_loss
from anonrisk.attack.model import Encoder
from anonrisk.config.schema import AttackConfig
from anonrisk.data.records import FaceRecord
from anonrisk.errors import AnonriskError
from anonrisk.stages import StageDir, atomic_path, fingerprint

TRAIN_VERSION = 1


class Preempted(AnonriskError):
    """Training stopped on a signal after writing a checkpoint; rerun to resume."""


def train_fingerprint(cfg: AttackConfig, data_fp: str, anon_fp: str, image_size: int) -> str:
    d = cfg.model_dump(exclude={"device", "checkpoint_every"})
    return fingerprint("train", TRAIN_VERSION, d, data_fp, anon_fp, image_size)


def lr_at(step: int, cfg: AttackConfig) -> float:
    warmup = max(1, cfg.steps // 20)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


class StopFlag:
    """Set by SIGTERM/SIGUSR1 while training runs (main thread only); previous handlers restored after."""

    def __init__(self):
        self.set = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def build_model(cfg: AttackConfig) -> tuple[Encoder, torch.Tensor]:
    torch.manual_seed(cfg.seed)
    model = Encoder(cfg.backbone, cfg.embed_dim, cfg.pretrained, cfg.input)
    log_t = torch.nn.Parameter(torch.tensor(math.log(cfg.temperature)), requires_grad=cfg.learn_temperature)
    return model, log_t


def save_checkpoint(path: Path, model, log_t, opt, step: int) -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "log_t": log_t.detach(), "opt": opt.state_dict(), "step": step}, tmp)


def train_attack(
    cfg: AttackConfig,
    anonymized: Sequence[FaceRecord],
    originals: Sequence[FaceRecord],
    image_size: int,
    stage: StageDir,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Train (or resume, or reuse) the encoder; returns the path of its weights."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    weights = stage / "encoder.safetensors"
    if stage.is_done():
        return weights
    stage.begin({"attack": cfg.model_dump(), "image_size": image_size})
    pairs = PairSource([r for r in anonymized if r.split == "train"], originals, image_size)
    per_identity = cfg.per_identity if cfg.positives == "identity" else 1
    sampler = IdentitySampler(pairs.identity, cfg.batch_size, cfg.seed, per_identity)
    model, log_t = build_model(cfg)
    model.to(device).train()
    params = list(model.parameters()) + ([log_t] if cfg.learn_temperature else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    ckpt_path = stage / "checkpoints/last.pt"
    start = 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        log_t.data.copy_(ckpt["log_t"])
        opt.load_state_dict(ckpt["opt"])
        start = int(ckpt["step"])
    log_path = stage / "log.jsonl"
    # keep the log consistent with the checkpoint: drop entries past the step we resume from
    kept = [line for line in (log_path.read_text().splitlines() if log_path.exists() else []) if json.loads(line)["step"] < start]
    log_path.write_text("".join(line + "\n" for line in kept))

    t0 = time.perf_counter()
    with StopFlag() as stop, open(log_path, "a") as log, tqdm(
        total=cfg.steps, initial=start, desc=f"train {stage.fingerprint[-12:]}", disable=None if progress else True, leave=False
    ) as bar:
        for step in range(start, cfg.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            idx = sampler(step)
            anon, orig = (Encoder.preprocess(t).to(device) for t in pairs.batch(idx))
            if cfg.augment:
                gen = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, step, 1]).integers(2**62)))
                anon, orig = augment(anon, gen), augment(orig, gen)
            labels = torch.as_tensor(pairs.identity[idx], device=device) if cfg.positives == "identity" else None
            loss = contrastive_loss(model(anon), model(orig), log_t.exp(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            log.write(json.dumps({"step": step, "loss": round(loss.item(), 6), "lr": lr_at(step, cfg)}) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            done = step + 1
            if done % cfg.checkpoint_every == 0 or stop.set:
                save_checkpoint(ckpt_path, model, log_t, opt, done)
            if stop.set and done < cfg.steps:
                raise Preempted(f"training stopped by signal at step {done}; checkpoint saved in {ckpt_path}")

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    stage.mark_done({"steps": cfg.steps, "resumed_from": start, "seconds": time.perf_counter() - t0, "temperature": float(log_t.exp())})
    return weights


def load_encoder(cfg: AttackConfig, weights: str | Path, device: str = "cpu") -> Encoder:
    from safetensors.torch import load_file

    model = Encoder(cfg.backbone, cfg.embed_dim, input=cfg.input)
    model.load_state_dict(load_file(str(weights)))
    return model.to(device).eval()
