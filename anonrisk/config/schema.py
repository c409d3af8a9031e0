"""The run config schema. Every model forbids unknown keys, so a typo is an error that names the key."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import ConfigDict, Field, field_validator

from anonrisk.config.validation import Strict, repeated


class SplitConfig(Strict):
    """Identity-disjoint split: ``test_fraction`` of identities are targets, ``aux_fraction`` belong to the
    black-box attacker, the rest train the attack."""

    test_fraction: float = Field(0.33, gt=0.0, lt=1.0)
    aux_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    use_official: bool = False  # CelebA: derive splits from list_eval_partition.txt instead
    seed: int = 0


class DataConfig(Strict):
    """``dataset`` is a registered dataset kind (synthetic, celeba, lfw, folder, or a plugin's); its own
    settings go in a section named after it (``synthetic: {identities: 150}``), checked by the kind's Params
    when the plan is built."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)  # the extra sections: kinds' settings

    dataset: str = "synthetic"
    root: Optional[str] = None
    image_size: int = Field(64, ge=16, le=2048)
    split: SplitConfig = SplitConfig()
    min_images_per_identity: int = Field(2, ge=2)
    max_identities: Optional[int] = Field(None, ge=2)
    on_bad_image: Literal["fail", "quarantine"] = "fail"
    # what the data fingerprint knows of a dataset's files (data.root): names, sizes and mtimes (stat: one
    # stat per file), or their SHA-256 too (sha256: reads every byte; copies keep the fingerprint)
    fingerprint: Literal["stat", "sha256"] = "stat"

    def kind_settings(self) -> dict[str, Any]:
        """The sections of dataset settings: kind -> its raw settings."""
        return dict(self.model_extra or {})


class Spec(Strict):
    """One anonymizer or attack: ``kind`` is a registered kind, ``name`` labels it in results, ``params``
    are the kind's settings (checked by the kind's Params when the plan is built)."""

    name: str
    kind: str
    params: dict[str, Any] = {}


class RayConfig(Strict):
    """The Ray runner (``anonymize.runner: ray``, on Ray Data); see docs/ray.md."""

    # None: the cluster RAY_ADDRESS names (`ray job submit` sets it), else start Ray inside this process;
    # "auto": RAY_ADDRESS or the cluster this node belongs to; "host:port": a GCS address; "ray://host:10001": Ray Client
    address: Optional[str] = None
    num_workers: Optional[int] = Field(None, ge=1)  # a fixed pool of actors (sets min_workers = max_workers)
    min_workers: int = Field(1, ge=1)  # the autoscaling pool's smallest size
    # its largest: GPU actors default to one per pending shard (an autoscaler adds the nodes), CPU actors to the CPUs now
    max_workers: Optional[int] = Field(None, ge=1)
    num_gpus_per_worker: Optional[float] = Field(None, ge=0)  # None: 1 for a GPU anonymizer on a cluster with GPUs now, else 0
    num_cpus_per_worker: float = Field(1.0, ge=0)
    # where images are decoded and resized: a CPU operator feeding the actors, or the actor itself; auto: the
    # operator for GPU actors, the actor for CPU actors (which already fill the CPUs: tasks would only add overhead)
    decode: Literal["auto", "tasks", "actor"] = "auto"
    num_cpus_per_decode: float = Field(0.0, ge=0)  # decode tasks; 0 lets them run beside CPU actors
    prefetch_shards: int = Field(2, ge=1)  # shards queued per actor (Ray Data's max_tasks_in_flight_per_actor)
    max_replacements: int = Field(3, ge=0)  # actors dying while they start (node lost during model load) replaced in a row
    wait_for_workers_s: float = Field(600.0, gt=0)  # for the first actors (an autoscaler starting nodes), then an error
    connect_timeout_s: float = Field(10.0, gt=0)
    # only when this process starts Ray (address: None)
    num_cpus: Optional[int] = Field(None, ge=1)
    object_store_mb: Optional[int] = Field(None, ge=75)
    temp_dir: Optional[str] = None


class AnonymizeConfig(Strict):
    batch_size: int = Field(32, ge=1)
    shard_size: int = Field(256, ge=1)
    seed: int = 0
    runner: Literal["local", "ray"] = "local"
    device: str = "auto"
    write_threads: int = Field(2, ge=0, le=64)  # PNG writers beside the anonymizer (0: write inline)
    ray: RayConfig = RayConfig()


class TrainConfig(Strict):
    """How a trained attack's encoder is trained (``train:``); an attack's ``params`` override any key."""

    backbone: str = "resnet18"
    pretrained: Optional[str] = None  # local weights file (.safetensors or .pt); never a download
    embed_dim: int = Field(128, ge=8)
    input: Literal["rgb", "edges", "rgb+edges"] = "rgb"  # what the backbone sees (edges: a fixed Sobel front end)
    temperature: float = Field(0.1, gt=0.0, le=10.0)
    learn_temperature: bool = False
    batch_size: int = Field(64, ge=2)
    # "pair": an anonymized image's only positive is its own original (the paper's attack);
    # "identity": every original of the same identity is a positive (the attacker knows its training ids)
    positives: Literal["pair", "identity"] = "identity"
    per_identity: int = Field(2, ge=1)  # images per identity in a batch (1 keeps identities unique)
    steps: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    augment: bool = True
    checkpoint_every: int = Field(50, ge=1)
    engine: Literal["torch", "deepspeed"] = "torch"
    device: str = "auto"
    seed: int = 0
    # training engine (issue 4; docs/training.md)
    optimizer: Literal["adamw", "sgd", "lars", "lamb"] = "adamw"  # lars/lamb: large batches (docs/large_batch.md)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # sgd and lars
    trust_coefficient: float = Field(0.001, gt=0.0)  # lars only: eta of the layer-wise trust ratio
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"  # peak lr = lr scaled by batch_size / lr_base_batch
    lr_base_batch: int = Field(256, ge=1)  # the batch train.lr was tuned at
    warmup_steps: Optional[int] = Field(None, ge=0)  # linear warmup; None: steps // 20 (at least 1)
    loss_tile: Optional[int] = Field(None, ge=1)  # rows per tile of the tiled loss; None: untiled (N x N matrices)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16 needs a GPU
    grad_cache_chunk: Optional[int] = Field(None, ge=1)  # pairs per GradCache chunk; None: the whole batch at once
    freeze_bn: bool = False  # BatchNorm on running statistics: makes GradCache chunking exact
    deepspeed: Optional[str] = None  # DeepSpeed preset in configs/deepspeed/ (zero0..zero3) or a .json/.yaml path
    zero_stage: Optional[int] = Field(None, ge=0, le=3)  # overrides the preset's ZeRO stage (default preset: zero2)


class UtilityConfig(Strict):
    """What the anonymization costs: SSIM and PSNR always; LPIPS and FID/KID only from local weight files
    (never downloaded): a metric whose weights are not given is skipped with the reason in the report."""

    enabled: bool = True
    lpips_net: Literal["alex", "vgg"] = "alex"
    lpips_backbone_weights: Optional[str] = None  # torchvision alexnet/vgg16 state dict (.pth or .safetensors)
    lpips_linear_weights: Optional[str] = None  # the LPIPS linear-layer weights (e.g. lpips' weights/v0.1/alex.pth)
    fid_weights: Optional[str] = None  # FID Inception (pytorch-fid / torch-fidelity .pth, .safetensors) or torchvision inception_v3
    fid_image_size: int = Field(299, ge=75, le=1024)
    kid_subset_size: int = Field(100, ge=2)


class VerificationConfig(Strict):
    """1:1 verification per attack: TAR at each FAR with 95 % intervals by identity, EER. Its bootstrap re-sorts
    every pair per draw, so by default it subsamples impostors and draws fewer times than the protocols."""

    enabled: bool = True
    fars: list[Annotated[float, Field(gt=0, lt=1)]] = [1e-2, 1e-3]
    impostors_per_probe: Optional[int] = Field(20, ge=1)  # null: every impostor pair (slow at scale)
    bootstrap: int = Field(100, ge=0)
    all_modes: bool = False  # false: the first configured mode only (exclude-source; linkage without labels)


class EvaluateConfig(Strict):
    protocols: list[Literal["full-ref", "few-ref", "single-ref"]] = ["full-ref", "few-ref", "single-ref"]
    modes: list[Literal["exclude-source", "linkage"]] = ["exclude-source", "linkage"]
    few_ref_k: int = Field(5, ge=1)
    pool_size: Union[int, Literal["all"]] = "all"
    score: Literal["max", "mean"] = "max"
    bootstrap: int = Field(1000, ge=0)
    seed: int = 0
    leakage: bool = True
    leakage_tolerance: int = Field(2, ge=0, le=20)
    utility: UtilityConfig = UtilityConfig()
    privacy: bool = True  # effective anonymity sets per attack (entropy and rank sets of full-ref)
    verification: VerificationConfig = VerificationConfig()
    verbatim: bool = True  # the share of pixels copied unchanged from the original (quality stage)

    @field_validator("pool_size")
    @classmethod
    def _pool(cls, v: Union[int, str]) -> Union[int, str]:
        if isinstance(v, int) and v < 2:
            raise ValueError("pool_size must be >= 2 or 'all'")
        return v


class TrackingConfig(Strict):
    mlflow: bool = True
    tracking_uri: Optional[str] = None  # default: sqlite database under runs_dir
    experiment: str = "anonrisk"
    # the samples grid of each anonymizer (results/<run>/plots/samples_<name>.png) into its MLflow child run:
    # anonymized images only, never an original
    log_images: bool = False
    samples: int = Field(4, ge=0, le=32)  # test identities in each samples grid (0: no samples grid)
    # originals beside the anonymized images in results/<run>/plots/; None: only for synthetic data, never
    # by default for a real dataset
    sample_originals: Optional[bool] = None


#: a run's name is one folder under results_dir: no separator, no "..", nothing a shell would trip on
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.+=-]*$"


class RunConfig(Strict):
    name: str = "run"  # results go to <results_dir>/<name>/
    runs_dir: str = "runs"
    results_dir: str = "results"
    data: DataConfig = DataConfig()
    anonymizers: list[Union[str, Spec]] = ["identity"]  # a bare name: a preset file or a kind (the loader resolves it)
    anonymize: AnonymizeConfig = AnonymizeConfig()
    train: TrainConfig = TrainConfig()  # the trained attacks' training settings
    # the threat models run against every anonymizer; a bare name is an attack kind with default settings
    attacks: list[Union[str, Spec]] = Field(["contrastive"], validate_default=True)  # bare names become specs
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    progress: bool = True

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not re.match(NAME_PATTERN, v) or len(v) > 200:
            raise ValueError("must be a plain folder name (letters, digits and _ . + = -, no '/' and not starting with '.'): "
                             "results go to <results_dir>/<name>/")
        return v

    @field_validator("anonymizers")
    @classmethod
    def _nonempty(cls, v: list) -> list:
        if not v:
            raise ValueError("at least one anonymizer is needed")
        return v

    @field_validator("attacks")
    @classmethod
    def _attacks(cls, v: list) -> list:
        if not v:
            raise ValueError("at least one attack is needed")
        specs = [Spec(name=a, kind=a) if isinstance(a, str) else a for a in v]
        dupes = repeated([s.name for s in specs])
        if dupes:
            raise ValueError(f"attack names must be unique, repeated: {', '.join(dupes)}")
        return specs


AttackConfig = TrainConfig  # its old name (``attack:``)
