"""The training-engine contract and its two engines: plain PyTorch (one process or DDP) and DeepSpeed.

An engine owns the model's distribution, precision, backward, optimizer step and checkpoints; the
contrastive step itself (``contrastive_step``: gathered loss, optional GradCache) is written once against
the contract:

    forward(x) -> (embeddings, temperature)     the wrapped model (DDP / DeepSpeed engine)
    chunk(last)                                  context around one chunk's forward + backward: gradient
                                                 sync only on the step's last chunk (GradCache)
    backward(scalar)                             accumulate parameter gradients
    step(lr)                                     one optimizer step at this learning rate
    save(dir, step) / load(dir) -> step | None   a checkpoint every rank can resume from
    export() -> {name: fp32 tensor}              the Encoder's full weights (a collective under ZeRO-3)

``validate_plan`` refuses impossible combinations before any model is built, with the reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from anonrisk.attack.dist import barrier, init_process_group, local_gpu_index, world
from anonrisk.attack.gradcache import freeze_batchnorm, full_batch_step, grad_cache_step, has_batchnorm
from anonrisk.attack.losses import gathered_contrastive_loss
from anonrisk.attack.model import Encoder
from anonrisk.config.schema import AttackConfig
from anonrisk.errors import ConfigError
from anonrisk.stages import atomic_path, write_json

log = logging.getLogger("anonrisk")

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


def build_model(cfg: AttackConfig) -> ContrastiveModel:
    torch.manual_seed(cfg.seed)
    return ContrastiveModel(Encoder(cfg.backbone, cfg.embed_dim, cfg.pretrained, cfg.input), cfg.temperature, cfg.learn_temperature)


# ---- the plan: settings resolved and checked before anything is built ----------------------------------
@dataclass
class Plan:
    engine: str
    device: str
    precision: str
    world_size: int
    rank: int
    per_rank_batch: int
    chunk: Optional[int]  # pairs per GradCache chunk; None: the whole per-rank batch in one pass
    zero_stage: Optional[int] = None
    ds_config: dict[str, Any] = field(default_factory=dict)

    @property
    def chunks(self) -> int:
        return 1 if self.chunk is None else self.per_rank_batch // self.chunk


def deepspeed_preset_path(name: str) -> Path:
    from anonrisk.config.loader import REPO_CONFIGS

    p = Path(name).expanduser()
    if p.suffix in (".json", ".yaml", ".yml"):
        if not p.exists():
            raise ConfigError(f"attack.deepspeed: DeepSpeed config file not found: {p}")
        return p
    dirs = [Path.cwd() / "configs" / "deepspeed", REPO_CONFIGS / "deepspeed"]
    for d in dirs:
        for ext in (".json", ".yaml", ".yml"):
            if (d / f"{name}{ext}").exists():
                return d / f"{name}{ext}"
    known = sorted({f.stem for d in dirs if d.is_dir() for f in d.iterdir() if f.suffix in (".json", ".yaml", ".yml")})
    raise ConfigError(f"attack.deepspeed: no preset {name!r}; presets: {', '.join(known) or 'none'} (or give a .json/.yaml path)")


def fused_adamw(device: torch.device) -> bool:
    """Whether AdamW runs fused (one kernel over all parameters), the same on both engines: on CUDA yes.
    DeepSpeed's presets get it as ``torch_adam`` + ``fused``, torch.optim.AdamW(fused=True) inside DeepSpeed,
    the torch engine's own kernel (DeepSpeed's FusedAdam is another kernel, built as a CUDA op). On the CPU
    torch has a fused AdamW too, but it rounds differently from the default loop (about 1 ulp per step):
    CPU runs keep the default on both engines, so CPU results stay as they were."""
    return torch.device(device).type == "cuda"


def deepspeed_config(cfg: AttackConfig, per_rank_batch: int, world_size: int, device: str = "cpu") -> dict[str, Any]:
    """The DeepSpeed config actually used: the preset (``attack.deepspeed``, default ``zero<zero_stage>``),
    with batch sizes, optimizer hyper-parameters, precision and ``attack.zero_stage`` filled from attack.*;
    a ``torch_adam`` AdamW fused exactly where the torch engine's is (``fused_adamw``) unless the preset says."""
    import yaml

    path = deepspeed_preset_path(cfg.deepspeed or f"zero{2 if cfg.zero_stage is None else cfg.zero_stage}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}  # JSON is YAML
    except yaml.YAMLError as exc:
        raise ConfigError(f"attack.deepspeed: {path} is not valid JSON/YAML: {exc}") from None
    ds = {k: v for k, v in raw.items() if not k.startswith("_")}
    gas = ds.get("gradient_accumulation_steps", 1)
    if gas != 1:
        raise ConfigError(
            f"attack.deepspeed: {path} sets gradient_accumulation_steps={gas}; anonrisk owns accumulation "
            "(one contrastive batch per step; use attack.grad_cache_chunk to split it): remove the key"
        )
    zero = dict(ds.get("zero_optimization", {}))
    if cfg.zero_stage is not None:
        zero["stage"] = cfg.zero_stage
    zero.setdefault("stage", 0)
    ds["zero_optimization"] = zero
    ds.update(train_batch_size=per_rank_batch * world_size, train_micro_batch_size_per_gpu=per_rank_batch, gradient_accumulation_steps=1)
    opt = dict(ds.get("optimizer", {"type": "AdamW", "params": {"torch_adam": True}}))
    opt["type"] = {"adamw": "AdamW", "sgd": "SGD"}[cfg.optimizer]
    params = {k: v for k, v in dict(opt.get("params", {})).items() if cfg.optimizer == "adamw" or k not in ("torch_adam", "betas", "eps")}
    params.update(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw" and params.get("torch_adam"):
        params.setdefault("fused", fused_adamw(device))  # DeepSpeed hands it to torch.optim.AdamW
    if cfg.optimizer == "sgd":
        params["momentum"] = cfg.momentum
    opt["params"] = params
    ds["optimizer"] = opt
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": cfg.precision == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": cfg.precision == "fp16"}
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def gradcache_refusal(stage: int) -> Optional[str]:
    """Why this DeepSpeed cannot run GradCache at this ZeRO stage, or None when it can.

    GradCache needs several backward passes to accumulate into one optimizer step with the gradient
    reduction deferred to the last. Stages 0 and 1 reduce only at the accumulation boundary
    (``set_gradient_accumulation_boundary``), in every release. Stages 2 and 3 partition gradients, so their
    reduction runs inside every backward (``engine.no_sync`` asserts against them); DeepSpeed 0.19 added
    ``engine.coalesce_grad_reduction()``, one reduction for several backward passes. Without it we refuse
    2 and 3 rather than sync every chunk.
    """
    if stage <= 1:
        return None
    from deepspeed.runtime.engine import DeepSpeedEngine

    if not hasattr(DeepSpeedEngine, "coalesce_grad_reduction"):
        import deepspeed

        return (
            f"attack.grad_cache_chunk with ZeRO stage {stage} needs DeepSpeed's coalesce_grad_reduction (0.19+; "
            f"installed: {deepspeed.__version__}): stages 2/3 reduce gradients inside every backward pass. "
            "Use attack.zero_stage=0 or 1, upgrade DeepSpeed, or drop attack.grad_cache_chunk"
        )
    return None


def validate_plan(cfg: AttackConfig, device: str, world_size: int = 1, rank: int = 0) -> Plan:
    """Resolve and check the training plan; an impossible combination is a ConfigError naming the reason."""
    dev = torch.device(device)
    if cfg.precision == "fp16" and dev.type == "cpu":
        raise ConfigError(
            "attack.precision=fp16 on the CPU: fp16 training needs a GPU (DeepSpeed refuses fp16 on the CPU and "
            "CPU autocast has no fp16 loss scaling); use attack.precision=bf16 or fp32"
        )
    if cfg.batch_size % world_size:
        raise ConfigError(
            f"attack.batch_size={cfg.batch_size} is not divisible by the world size {world_size} "
            f"(processes launched): every rank embeds an equal share of the global batch; use a multiple of {world_size}"
        )
    per_rank = cfg.batch_size // world_size
    chunk = cfg.grad_cache_chunk
    if chunk is not None and (chunk > per_rank or per_rank % chunk):
        raise ConfigError(
            f"attack.grad_cache_chunk={chunk} must divide the per-rank batch {per_rank} "
            f"(attack.batch_size={cfg.batch_size} / {world_size} ranks): GradCache runs equal chunks of pairs"
        )
    plan = Plan(cfg.engine, device, cfg.precision, world_size, rank, per_rank, chunk)
    if cfg.engine == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError("attack.engine=deepspeed needs DeepSpeed: pip install 'anonrisk[deepspeed]'") from None
        plan.ds_config = deepspeed_config(cfg, per_rank, world_size, device)
        plan.zero_stage = int(plan.ds_config["zero_optimization"]["stage"])
        if plan.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"attack.zero_stage: ZeRO stage {plan.zero_stage} does not exist (0, 1, 2 or 3)")
        if chunk is not None:
            reason = gradcache_refusal(plan.zero_stage)
            if reason:
                raise ConfigError(reason)
    elif cfg.zero_stage is not None or cfg.deepspeed is not None:
        raise ConfigError("attack.zero_stage / attack.deepspeed apply to attack.engine=deepspeed only")
    return plan


# ---- engines ------------------------------------------------------------------------------------------
class Engine:
    """Shared parts of both engines. ``module`` is the unwrapped ContrastiveModel."""

    name = "base"
    module: ContrastiveModel

    def __init__(self, plan: Plan, cfg: AttackConfig):
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


class TorchEngine(Engine):
    """Plain PyTorch: one process, or DistributedDataParallel when a process group has several ranks.
    bf16/fp16 through autocast (fp16 with a GradScaler, GPU only); channels_last on the GPU."""

    name = "torch"

    def __init__(self, plan: Plan, cfg: AttackConfig, model: ContrastiveModel):
        super().__init__(plan, cfg)
        self.module = model.to(self.device)
        if self.device.type == "cuda":
            self.module = self.module.to(memory_format=torch.channels_last)
        self.train_mode()
        self.wrapped = self.module
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = DDP(self.module, device_ids=ids, broadcast_buffers=not cfg.freeze_bn)
        params = [p for p in self.module.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd":
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
            with atomic_path(ckpt_dir / "last.pt") as tmp:
                torch.save({"model": self.module.state_dict(), "opt": self.opt.state_dict(), "step": step,
                            "scaler": self.scaler.state_dict() if self.scaler else None}, tmp)
        barrier()

    def load(self, ckpt_dir):
        path = ckpt_dir / "last.pt"
        if not path.exists():
            return None
        ckpt = torch.load(path, map_location=self.device, weights_only=True)
        self.module.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["opt"])
        if self.scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        return int(ckpt["step"])

    def export(self):
        return {k: _fp32(v).cpu().contiguous() for k, v in self.module.encoder.state_dict().items()}


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

    def __init__(self, plan: Plan, cfg: AttackConfig, model: ContrastiveModel):
        super().__init__(plan, cfg)
        import deepspeed

        params = [p for p in model.parameters() if p.requires_grad]
        self.ds, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=dict(plan.ds_config))
        self.module = self.ds.module
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.precision, torch.float32)
        self.ds.checkpoint_engine = _weights_only_checkpoint_engine(self.ds.checkpoint_engine)
        if plan.chunk is not None and plan.zero_stage >= 2 and not hasattr(self.ds.optimizer, "_coalesce_grad_reduction"):
            raise ConfigError(
                f"attack.grad_cache_chunk with ZeRO stage {plan.zero_stage}: DeepSpeed's "
                f"{type(self.ds.optimizer).__name__} cannot defer gradient reduction across chunks; "
                "use attack.zero_stage=0 or 1, or drop attack.grad_cache_chunk"
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
        tag = json.loads(pointer.read_text())["tag"]
        path, client = self.ds.load_checkpoint(str(ckpt_dir / "deepspeed"), tag=tag)
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
            out[name] = _fp32(b).cpu()
        return out

    def export(self):
        full = self._full_params()
        return {k[len("encoder."):]: v.contiguous() for k, v in full.items() if k.startswith("encoder.")}

    def export_log_t(self):
        return self._full_params()["log_t"]


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """Floating tensors as fp32 (bf16 engines export fp32 weights); counters keep their integer type."""
    return t.detach().float() if t.is_floating_point() else t.detach()


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


def build_engine(cfg: AttackConfig, device: str) -> tuple[Engine, Plan]:
    """Set up the process group the launcher asked for, validate the plan, build the model and engine."""
    env = init_process_group(always=cfg.engine == "deepspeed")
    rank, world_size = world()
    if torch.device(device).type == "cuda" and world_size > 1:
        device = f"cuda:{local_gpu_index(env.local_rank)}"  # cuda:0 when Slurm shows each task one GPU
    plan = validate_plan(cfg, device, world_size, rank)
    model = build_model(cfg)
    if (cfg.grad_cache_chunk is not None) and has_batchnorm(model) and not cfg.freeze_bn:
        log.warning("attack.grad_cache_chunk with BatchNorm in %s: statistics are per chunk, not per batch "
                    "(set attack.freeze_bn=true for exact GradCache)", cfg.backbone)
    engine = (DeepSpeedEngine if cfg.engine == "deepspeed" else TorchEngine)(plan, cfg, model)
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

    def loss_fn(embs: list[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        a = torch.cat([e[: e.shape[0] // 2] for e in embs])
        b = torch.cat([e[e.shape[0] // 2:] for e in embs])
        return gathered_contrastive_loss(a, b, t.float(), labels)

    def make(rows: slice):
        return lambda: torch.cat([prepare(anon[rows], rows, 0), prepare(orig[rows], rows, 1)])

    inputs = [make(slice(i, i + chunk)) for i in range(0, n, chunk)]
    if len(inputs) == 1:
        return full_batch_step(engine.forward, inputs[0], loss_fn, engine.backward, engine.chunk)
    return grad_cache_step(engine.forward, inputs, loss_fn, engine.backward, engine.chunk)
