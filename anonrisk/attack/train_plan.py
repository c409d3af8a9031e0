"""The training plan: settings resolved and checked before anything is built (``validate_plan``), and the
DeepSpeed config actually used. An impossible combination (fp16 on the CPU, a batch the launched ranks
cannot share, GradCache on an unsupported ZeRO stage) is a ConfigError naming the reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from anonrisk.config.schema import TrainConfig
from anonrisk.errors import ConfigError


#: optimizers with layer-wise trust ratios (anonrisk.attack.optim)
LAYERWISE = ("lars", "lamb")


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
            raise ConfigError(f"train.deepspeed: DeepSpeed config file not found: {p}")
        return p
    dirs = [Path.cwd() / "configs" / "deepspeed", REPO_CONFIGS / "deepspeed"]
    for d in dirs:
        for ext in (".json", ".yaml", ".yml"):
            if (d / f"{name}{ext}").exists():
                return d / f"{name}{ext}"
    known = sorted({f.stem for d in dirs if d.is_dir() for f in d.iterdir() if f.suffix in (".json", ".yaml", ".yml")})
    raise ConfigError(f"train.deepspeed: no preset {name!r}; presets: {', '.join(known) or 'none'} (or give a .json/.yaml path)")


def fused_adamw(device) -> bool:
    """Whether AdamW runs fused (one kernel over all parameters), the same on both engines: on CUDA yes.
    DeepSpeed's presets get it as ``torch_adam`` + ``fused``, torch.optim.AdamW(fused=True) inside DeepSpeed,
    the torch engine's own kernel (DeepSpeed's FusedAdam is another kernel, built as a CUDA op). On the CPU
    torch has a fused AdamW too, but it rounds differently from the default loop (about 1 ulp per step):
    CPU runs keep the default on both engines, so CPU results stay as they were."""
    import torch

    return torch.device(device).type == "cuda"


def deepspeed_config(cfg: TrainConfig, per_rank_batch: int, world_size: int, device: str = "cpu") -> dict[str, Any]:
    """The DeepSpeed config actually used: the preset (``train.deepspeed``, default ``zero<zero_stage>``),
    with batch sizes, optimizer hyper-parameters, precision and ``train.zero_stage`` filled from train.*;
    a ``torch_adam`` AdamW fused exactly where the torch engine's is (``fused_adamw``) unless the preset says."""
    import yaml

    path = deepspeed_preset_path(cfg.deepspeed or f"zero{2 if cfg.zero_stage is None else cfg.zero_stage}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}  # JSON is YAML
    except yaml.YAMLError as exc:
        raise ConfigError(f"train.deepspeed: {path} is not valid JSON/YAML: {exc}") from None
    ds = {k: v for k, v in raw.items() if not k.startswith("_")}
    gas = ds.get("gradient_accumulation_steps", 1)
    if gas != 1:
        raise ConfigError(
            f"train.deepspeed: {path} sets gradient_accumulation_steps={gas}; anonrisk owns accumulation "
            "(one contrastive batch per step; use train.grad_cache_chunk to split it): remove the key"
        )
    zero = dict(ds.get("zero_optimization", {}))
    if cfg.zero_stage is not None:
        zero["stage"] = cfg.zero_stage
    zero.setdefault("stage", 0)
    ds["zero_optimization"] = zero
    ds.update(train_batch_size=per_rank_batch * world_size, train_micro_batch_size_per_gpu=per_rank_batch, gradient_accumulation_steps=1)
    if cfg.optimizer in LAYERWISE:  # anonrisk hands DeepSpeed the optimizer itself (ZeRO 0, fp32 only)
        ds.pop("optimizer", None)
        return _finish(ds, cfg)
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
    return _finish(ds, cfg)


def _finish(ds: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": cfg.precision == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": cfg.precision == "fp16"}
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def layerwise_refusal(cfg: TrainConfig, zero_stage: int) -> Optional[str]:
    """Why DeepSpeed cannot step LARS/LAMB in this plan, or None. Their trust ratio needs each weight
    tensor's own norms; ZeRO 1-3 and DeepSpeed's bf16/fp16 optimizers step flattened partitions instead
    (DeepSpeed issue #490), so only ZeRO 0 in fp32 steps the real tensors."""
    if cfg.optimizer not in LAYERWISE or (zero_stage == 0 and cfg.precision == "fp32"):
        return None
    return (f"train.optimizer={cfg.optimizer} with train.engine=deepspeed needs train.zero_stage=0 and "
            f"train.precision=fp32 (got ZeRO {zero_stage}, {cfg.precision}): ZeRO 1-3 and DeepSpeed's half-precision "
            "optimizers step flattened partitions, so the per-tensor trust ratio would be wrong; use train.engine=torch "
            "(any precision) or ZeRO 0 in fp32")


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
            f"train.grad_cache_chunk with ZeRO stage {stage} needs DeepSpeed's coalesce_grad_reduction (0.19+; "
            f"installed: {deepspeed.__version__}): stages 2/3 reduce gradients inside every backward pass. "
            "Use train.zero_stage=0 or 1, upgrade DeepSpeed, or drop train.grad_cache_chunk"
        )
    return None


def validate_plan(cfg: TrainConfig, device: str, world_size: int = 1, rank: int = 0) -> Plan:
    """Resolve and check the training plan; an impossible combination is a ConfigError naming the reason."""
    import torch

    dev = torch.device(device)
    if cfg.precision == "fp16" and dev.type == "cpu":
        raise ConfigError(
            "train.precision=fp16 on the CPU: fp16 training needs a GPU (DeepSpeed refuses fp16 on the CPU and "
            "CPU autocast has no fp16 loss scaling); use train.precision=bf16 or fp32"
        )
    if cfg.batch_size % world_size:
        raise ConfigError(
            f"train.batch_size={cfg.batch_size} is not divisible by the world size {world_size} "
            f"(processes launched): every rank embeds an equal share of the global batch; use a multiple of {world_size}"
        )
    if cfg.warmup_steps is not None and cfg.warmup_steps > cfg.steps:
        raise ConfigError(f"train.warmup_steps={cfg.warmup_steps} is more than train.steps={cfg.steps}: "
                          "the warmup must end within the training")
    per_rank = cfg.batch_size // world_size
    chunk = cfg.grad_cache_chunk
    if chunk is not None and (chunk > per_rank or per_rank % chunk):
        raise ConfigError(
            f"train.grad_cache_chunk={chunk} must divide the per-rank batch {per_rank} "
            f"(train.batch_size={cfg.batch_size} / {world_size} ranks): GradCache runs equal chunks of pairs"
        )
    plan = Plan(cfg.engine, device, cfg.precision, world_size, rank, per_rank, chunk)
    if cfg.engine == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError("train.engine=deepspeed needs DeepSpeed: pip install 'anonrisk[deepspeed]'") from None
        plan.ds_config = deepspeed_config(cfg, per_rank, world_size, device)
        plan.zero_stage = int(plan.ds_config["zero_optimization"]["stage"])
        if plan.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage: ZeRO stage {plan.zero_stage} does not exist (0, 1, 2 or 3)")
        reason = layerwise_refusal(cfg, plan.zero_stage) or (gradcache_refusal(plan.zero_stage) if chunk is not None else None)
        if reason:
            raise ConfigError(reason)
    elif cfg.zero_stage is not None or cfg.deepspeed is not None:
        raise ConfigError("train.zero_stage / train.deepspeed apply to train.engine=deepspeed only")
    return plan



def check_training(cfg: TrainConfig) -> Plan:
    """``validate_plan`` for this process: the configured device, the world size the launcher set."""
    from anonrisk.attack.dist import read_env
    from anonrisk.devices import resolve_device

    return validate_plan(cfg, resolve_device(cfg.device), read_env().world_size)
