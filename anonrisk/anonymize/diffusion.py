"""Diffusion anonymizers: Stable Diffusion (text-to-image, inpainting, img2img) with any set of ControlNets.

One class, one ``__call__``, one denoising loop written over diffusers components (UNet, ControlNets, VAE,
CLIP text encoder, a scheduler), so that every mode shares the same per-record seeding, the same guard and
the same GPU path, and so that ``camouflage.py`` can add a guidance term without copying the loop.

Per record ``i`` (``seeds[i]`` alone decides it, so a batched call equals one-by-one calls):
- the prompt (template fields drawn from ``prompt_lists``) and the CFG scale (a list = one value drawn);
- the initial noise, drawn on the CPU from ``torch.Generator().manual_seed(seed)`` (same noise on any device);
- a retry after a NaN/black output uses a seed derived from (seed, attempt).

Modes: ``txt2img`` (structure only from the ControlNets), ``inpaint`` (redraw a mask: a fixed ellipse or box
for aligned crops, a mask file, or a face detector; 9-channel inpainting UNets get mask + masked-image
latents, 4-channel UNets are blended with the re-noised original at every step; the unmasked pixels are
pasted back) and ``img2img`` (start from the noised original at ``strength``).

Models: ``model`` is a local diffusers directory, a hub id already in the local cache (``allow_download``
lets diffusers fetch it), or ``random:tiny`` / ``random:sd15`` (random weights built from configs:
tests, quickstart, throughput). Heavy libraries are imported inside functions only.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar, Literal, Optional, Sequence, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from anonrisk.anonymize.base import ANONYMIZERS, Anonymizer, check_batch
from anonrisk.anonymize.conditioning import Condition, ConditionMaps, check_annotator, parse_condition
from anonrisk.errors import ConfigError

log = logging.getLogger("anonrisk.diffusion")

RANDOM_PREFIX = "random:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


# ----------------------------------------------------------------------------------------------------------
# parameters


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MaskSpec(_Strict):
    """The region an ``inpaint`` anonymizer redraws (white = redraw). Fractions are of the image side."""

    kind: Literal["ellipse", "box", "file", "full", "detector"] = "ellipse"
    center: tuple[float, float] = (0.5, 0.5)
    radii: tuple[float, float] = (0.34, 0.44)
    box: tuple[float, float, float, float] = (0.15, 0.05, 0.85, 0.95)  # x0, y0, x1, y1
    path: Optional[str] = None  # kind=file: a grayscale image, resized to the working resolution
    detector: Literal["haar"] = "haar"  # kind=detector: OpenCV Haar cascade
    detector_weights: Optional[str] = None  # the cascade XML (haarcascade_frontalface_default.xml)
    margin: float = Field(0.3, ge=0.0, le=3.0)  # grow detections by this fraction of their size
    fallback: Literal["ellipse", "full"] = "ellipse"  # when the detector finds nothing
    feather: float = Field(0.03, ge=0.0, le=0.5)  # soft edge of the paste-back


class GuardSpec(_Strict):
    """NaN / black-output guard: retry a bad record with a derived seed, then flag it (or raise)."""

    retries: int = Field(2, ge=0, le=10)
    black_level: float = Field(4.0, ge=0.0, le=255.0)  # an output whose brightest pixel is below this is black
    on_fail: Literal["flag", "raise"] = "flag"


class DiffusionParams(_Strict):
    model: str
    mode: Literal["txt2img", "inpaint", "img2img"] = "txt2img"
    conditions: list[Union[str, dict[str, Any]]] = []
    controlnets: Union[str, list[str]] = []  # one per condition, same order; "random:<arch>" = one each
    annotator_weights: dict[str, str] = {}  # annotator -> local weights path, or "random"
    random_seed: int = 0  # seeds random:<arch> weights and random annotators
    vae: Optional[str] = None  # a separate VAE (local dir or hub id)
    scheduler: Literal["unipc", "ddim", "dpmpp", "euler", "pndm"] = "unipc"
    steps: int = Field(30, ge=1, le=1000)
    strength: float = Field(1.0, gt=0.0, le=1.0)  # img2img / inpaint: how much noise the original gets
    guidance_scale: Union[float, list[float]] = 7.5  # a list: one value drawn per record
    prompt: str = "a photo of a person"  # {field}s are drawn per record from prompt_lists[field]
    prompt_lists: dict[str, list[str]] = {}
    negative_prompt: str = ""
    resolution: int = Field(512, ge=16, le=4096)  # working resolution: the longest side (multiple of 8)
    mask: MaskSpec = MaskSpec()
    paste_back: bool = True  # inpaint: keep the original pixels outside the mask
    control_uncond: bool = True  # ControlNets also on the unconditional CFG branch (False: half the cost)
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on CUDA, fp32 elsewhere
    attention: Literal["auto", "sdpa", "xformers"] = "auto"
    channels_last: Union[bool, Literal["auto"]] = "auto"  # auto: on CUDA
    compile: bool = False
    compile_mode: str = "default"
    fuse_qkv: bool = False
    guard: GuardSpec = GuardSpec()
    condition_cache_dir: Optional[str] = None
    condition_cache_mb: int = Field(256, ge=0)
    allow_download: bool = False  # hub ids: let diffusers download what the local cache lacks


#: params that change how fast, not what: kept out of ``describe()`` (and so out of fingerprints)
OPERATIONAL = ("condition_cache_dir", "condition_cache_mb", "allow_download")


def parse_params(model: type[BaseModel], params: dict[str, Any], kind: str) -> Any:
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            tags = {"str", "int", "float", "bool"}
            loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and (p in tags or "[" in p)))
            if err["type"] == "missing":
                lines.append(f"params.{loc}: required")
            elif err["type"] == "extra_forbidden":
                lines.append(f"params.{loc}: unknown key; valid keys: {', '.join(model.model_fields)}")
            else:
                lines.append(f"params.{loc}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"{kind}: " + "; ".join(dict.fromkeys(lines))) from None


# ----------------------------------------------------------------------------------------------------------
# model locations


def random_arch(spec: str) -> Optional[str]:
    from anonrisk.anonymize.tiny import ARCHS

    if spec in ("tiny",):
        return "tiny"
    if spec.startswith(RANDOM_PREFIX):
        arch = spec[len(RANDOM_PREFIX):]
        if arch not in ARCHS:
            raise ConfigError(f"unknown random architecture {spec!r}; known: {', '.join(RANDOM_PREFIX + a for a in ARCHS)}")
        return arch
    return None


def check_location(spec: str, key: str, allow_download: bool, marker: str, subfolders: Sequence[str] = ()) -> None:
    """ConfigError unless ``spec`` is an existing local folder (with ``subfolders``) or a hub id that is in
    the local Hugging Face cache (or ``allow_download``)."""
    if random_arch(spec):
        return
    p = Path(os.path.expanduser(spec))
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"{key}: {spec!r} is a file; expected a diffusers model folder")
        missing = [s for s in subfolders if not (p / s).is_dir()]
        if missing:
            raise ConfigError(f"{key}: model folder {spec!r} lacks {', '.join(s + '/' for s in missing)} (expected the diffusers layout)")
        return
    looks_like_hub = bool(_HUB_ID.match(spec)) and not spec.startswith((".", "~"))
    if not looks_like_hub:
        raise ConfigError(f"{key}: model path {spec!r} does not exist (expected a local diffusers folder or a hub id)")
    if allow_download:
        return
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec, marker)
    if not isinstance(cached, str):
        raise ConfigError(
            f"{key}: model path {spec!r} is not a local folder and hub id {spec!r} is not in the local Hugging Face "
            f"cache; point {key} at a local folder (e.g. one made with `huggingface-cli download {spec} --local-dir ...`) "
            f"or set params.allow_download: true"
        )


def _local_kwargs(spec: str, allow_download: bool) -> dict[str, Any]:
    p = Path(os.path.expanduser(spec))
    return {"pretrained_model_name_or_path": str(p) if p.exists() else spec, "local_files_only": not allow_download or p.exists()}


def _unet_in_channels(spec: str) -> Optional[int]:
    cfg = Path(os.path.expanduser(spec), "unet", "config.json")
    if cfg.is_file():
        import json

        return int(json.loads(cfg.read_text()).get("in_channels", 4))
    return None


# ----------------------------------------------------------------------------------------------------------
# device helpers


_XFORMERS_OK: dict[str, tuple[bool, str]] = {}


def xformers_usable(device) -> tuple[bool, str]:
    """Whether xformers' attention kernels actually run on ``device`` (checked once per device)."""
    key = str(device)
    if key not in _XFORMERS_OK:
        if getattr(device, "type", str(device)) != "cuda":
            _XFORMERS_OK[key] = (False, "xformers needs a CUDA device")
        else:
            try:
                import torch
                import xformers.ops  # noqa: F401  (optional GPU extra)

                q = torch.randn(1, 64, 2, 40, device=device, dtype=torch.float16)
                xformers.ops.memory_efficient_attention(q, q, q)
                torch.cuda.synchronize(device)
                _XFORMERS_OK[key] = (True, "")
            except Exception as exc:  # noqa: BLE001 - any failure means: do not use it
                _XFORMERS_OK[key] = (False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return _XFORMERS_OK[key]


def _resize(x, h: int, w: int):
    """Bicubic resize with antialiasing of a float (N,C,H,W) batch (per image, so batch-invariant)."""
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == (h, w):
        return x
    return F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)


def derived_seed(seed: int, attempt: int) -> int:
    """The noise seed of a retry: attempt 0 is the record seed itself."""
    if attempt == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), attempt, 0x5EED]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class GuardEvent:
    seed: int
    attempt: int
    reason: str
    flagged: bool = False


@dataclass
class Models:
    device: Any
    dtype: Any
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict
    controlnets: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    attention: str = "sdpa"  # the attention backend _optimize actually enabled

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def unet_in(self) -> int:
        return int(self.unet.config.in_channels)


_SCHEDULERS = {
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}


# ----------------------------------------------------------------------------------------------------------
# the anonymizer


@ANONYMIZERS.register("diffusion")
class DiffusionAnonymizer(Anonymizer):
    """Stable Diffusion + ControlNets; see the module docstring and docs/diffusion.md."""

    version: ClassVar[int] = 1
    device_kind: ClassVar[str] = "gpu"
    Params: ClassVar[type[BaseModel]] = DiffusionParams
    kind: ClassVar[str] = "diffusion"

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.p = parse_params(self.Params, params, f"anonymizer kind {self.kind}")
        self.conditions: list[Condition] = [parse_condition(c, i) for i, c in enumerate(self.p.conditions)]
        fields = set(re.findall(r"{(\w+)}", self.p.prompt))
        missing = sorted(fields - set(self.p.prompt_lists))
        if missing:
            raise ConfigError(f"params.prompt: template field(s) {', '.join(missing)} have no list in params.prompt_lists")
        if any(not v for v in self.p.prompt_lists.values()):
            raise ConfigError("params.prompt_lists: every list needs at least one entry")
        gs = self.p.guidance_scale
        if isinstance(gs, list) and not gs:
            raise ConfigError("params.guidance_scale: an empty list; give a number or a list of choices")
        self.m: Optional[Models] = None
        self.guard_events: list[GuardEvent] = []
        self._embeds: dict[str, Any] = {}
        self._maps: Optional[ConditionMaps] = None
        self._validated = False

    # ---- contract ------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        params = {k: v for k, v in self.params.items() if k not in OPERATIONAL}
        return {"class": type(self).__name__, "version": self.version, "params": params}

    @property
    def flagged(self) -> list[GuardEvent]:
        """Records whose output stayed NaN/black after every retry."""
        return [e for e in self.guard_events if e.flagged]

    def controlnet_specs(self) -> list[str]:
        cn = self.p.controlnets
        if isinstance(cn, str):
            return [cn] * len(self.conditions) if random_arch(cn) else [cn]
        return list(cn)

    def validate(self) -> None:
        p = self.p
        check_location(p.model, "params.model", p.allow_download, "model_index.json",
                       ("unet", "text_encoder", "tokenizer", "scheduler") + (() if p.vae else ("vae",)))
        if p.vae:
            check_location(p.vae, "params.vae", p.allow_download, "config.json")
        if p.resolution % 8:
            raise ConfigError(f"params.resolution: {p.resolution} is not a multiple of 8")
        in_ch = 9 if (random_arch(p.model) and p.mode == "inpaint") else _unet_in_channels(p.model)
        if in_ch == 9 and p.mode != "inpaint":
            raise ConfigError(f"params.mode: {p.model!r} is an inpainting model (9-channel UNet); use mode: inpaint")
        cns = self.controlnet_specs()
        if len(cns) != len(self.conditions):
            names = ", ".join(c.name for c in self.conditions) or "none"
            raise ConfigError(
                f"params.controlnets: {len(cns)} ControlNet(s) given for {len(self.conditions)} condition(s) ({names}); "
                f"give exactly one ControlNet per condition, in the same order"
            )
        for i, spec in enumerate(cns):
            check_location(spec, f"params.controlnets[{i}]", p.allow_download, "config.json")
        for i, cond in enumerate(self.conditions):
            check_annotator(cond, i, p.annotator_weights)
        if p.mode == "inpaint":
            self._validate_mask()
        if p.mode != "txt2img" and int(p.steps * p.strength) < 1:
            raise ConfigError(f"params.strength: {p.strength} x {p.steps} steps leaves no denoising step")
        self._validate_extra()
        self._validated = True

    def _validate_extra(self) -> None:
        """Subclass hook."""

    def _validate_mask(self) -> None:
        mk = self.p.mask
        if mk.kind == "file":
            if not mk.path or not Path(mk.path).is_file():
                raise ConfigError(f"params.mask.path: mask file {mk.path!r} does not exist (kind: file needs a grayscale image)")
        if mk.kind == "detector":
            if not mk.detector_weights or not Path(mk.detector_weights).is_file():
                raise ConfigError(
                    f"params.mask.detector_weights: the {mk.detector} detector needs a local cascade file "
                    f"(haarcascade_frontalface_default.xml), got {mk.detector_weights!r}; or use mask.kind ellipse/box for aligned crops"
                )

    def setup(self, device: str = "cpu") -> None:
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if self.m is not None and self.m.device == dev:
            return
        if not self._validated:
            self.validate()
        self.m = self._load(dev)
        self._embeds = {}
        self._maps = ConditionMaps(self.p.annotator_weights, seed=self.p.random_seed, cache_dir=self.p.condition_cache_dir,
                                   max_bytes=self.p.condition_cache_mb << 20, device=str(dev))

    def __call__(self, images: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        check_batch(images, seeds)
        if len(images) == 0:
            return images.copy()
        if self.m is None:
            self.setup("auto")
        seeds = [int(s) for s in seeds]
        out = np.empty_like(images)
        todo = list(range(len(images)))
        attempt = 0
        while todo:
            imgs, reasons = self._generate(images[todo], [seeds[i] for i in todo], [derived_seed(seeds[i], attempt) for i in todo])
            retry = []
            for j, i in enumerate(todo):
                out[i] = imgs[j]
                if reasons[j] is None:
                    continue
                last = attempt >= self.p.guard.retries
                self.guard_events.append(GuardEvent(seeds[i], attempt, reasons[j], flagged=last))
                if not last:
                    retry.append(i)
                elif self.p.guard.on_fail == "raise":
                    raise RuntimeError(f"{self.kind}: record with seed {seeds[i]} gave a {reasons[j]} output after {attempt + 1} attempt(s)")
                else:
                    log.warning("%s: record with seed %d gave a %s output after %d attempt(s); flagged", self.kind, seeds[i], reasons[j], attempt + 1)
            todo, attempt = retry, attempt + 1
        return out

    # ---- loading -------------------------------------------------------------------------------------

    def _dtype(self, dev):
        import torch

        name = self.p.dtype
        if name == "auto":
            name = "fp16" if dev.type == "cuda" else "fp32"
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]

    def _load(self, dev) -> Models:
        import torch

        from anonrisk.weights import own_aligned_

        p = self.p
        dtype = self._dtype(dev)
        arch = random_arch(p.model)
        inpaint_unet = p.mode == "inpaint"
        if arch:
            from anonrisk.anonymize import tiny

            comp = tiny.build_components(arch, p.random_seed, unet_in_channels=9 if inpaint_unet else 4)
            unet, vae, te, tok, sched_cfg = comp["unet"], comp["vae"], comp["text_encoder"], comp["tokenizer"], comp["scheduler_config"]
        else:
            from diffusers import AutoencoderKL, UNet2DConditionModel
            from transformers import CLIPTextModel, CLIPTokenizer

            kw = _local_kwargs(p.model, p.allow_download)
            unet = UNet2DConditionModel.from_pretrained(**kw, subfolder="unet", torch_dtype=dtype)
            te = CLIPTextModel.from_pretrained(kw["pretrained_model_name_or_path"], subfolder="text_encoder", dtype=dtype,
                                               local_files_only=kw["local_files_only"])
            tok = CLIPTokenizer.from_pretrained(kw["pretrained_model_name_or_path"], subfolder="tokenizer", local_files_only=kw["local_files_only"])
            if p.vae:
                vae = AutoencoderKL.from_pretrained(**_local_kwargs(p.vae, p.allow_download), torch_dtype=dtype)
            else:
                vae = AutoencoderKL.from_pretrained(**kw, subfolder="vae", torch_dtype=dtype)
            from diffusers import DDIMScheduler

            sched_cfg = dict(DDIMScheduler.load_config(kw["pretrained_model_name_or_path"], subfolder="scheduler",
                                                       local_files_only=kw["local_files_only"]))
        controlnets = [self._load_controlnet(spec, i, dtype) for i, spec in enumerate(self.controlnet_specs())]
        m = Models(dev, dtype, unet, vae, te, tok, sched_cfg, controlnets)
        m.extra = self._load_extra(dtype)
        for mod in self._modules(m):
            own_aligned_(mod)  # loaded weights sit unaligned in the file buffer: see weights.own_aligned_
            mod.requires_grad_(False).eval().to(dev)
            if mod.dtype != dtype:
                mod.to(dtype=dtype)
        self._optimize(m)
        return m

    def _load_controlnet(self, spec: str, index: int, dtype, latent_conditioning: bool = False, seed: Optional[int] = None):
        from anonrisk.anonymize import tiny

        arch = random_arch(spec)
        if arch:
            return tiny.build_controlnet(arch, seed if seed is not None else tiny.controlnet_seed(self.p.random_seed, index),
                                         latent_conditioning=latent_conditioning)
        from diffusers import ControlNetModel

        return ControlNetModel.from_pretrained(**_local_kwargs(spec, self.p.allow_download), torch_dtype=dtype)

    def _load_extra(self, dtype) -> dict:
        """Subclass hook: more networks (stored in ``Models.extra``)."""
        return {}

    def runtime(self) -> dict:
        if self.m is None:
            return {}
        p, m = self.p, self.m
        from anonrisk.devices import device_name

        return {"device": device_name(m.device), "dtype": str(m.dtype).removeprefix("torch."), "attention": m.attention,
                "compile": bool(p.compile), "fuse_qkv": bool(p.fuse_qkv)}

    @staticmethod
    def _modules(m: Models) -> list:
        return [m.unet, m.vae, m.text_encoder, *m.controlnets, *m.extra.values()]

    def _optimize(self, m: Models) -> None:
        """Attention backend, channels_last, fused QKV, torch.compile (the GPU path)."""
        import torch

        p = self.p
        nets = [m.unet, *m.controlnets, *m.extra.values()]
        m.attention = "sdpa"
        if p.attention in ("auto", "xformers"):
            ok, why = xformers_usable(m.device)
            if ok:
                for net in nets + [m.vae]:
                    net.enable_xformers_memory_efficient_attention()
                m.attention = "xformers"
                log.info("attention: xformers")
            elif p.attention == "xformers":
                log.warning("attention: xformers requested but its kernels do not run on %s (%s); using SDPA", m.device, why)
            else:
                log.info("attention: SDPA (xformers unavailable: %s)", why)
        if p.fuse_qkv:
            for net in nets:
                net.fuse_qkv_projections()
        cl = p.channels_last if p.channels_last != "auto" else m.device.type == "cuda"
        if cl:
            for net in nets + [m.vae]:
                net.to(memory_format=torch.channels_last)
        if p.compile:
            m.unet = torch.compile(m.unet, mode=p.compile_mode, fullgraph=False)
            m.controlnets = [torch.compile(c, mode=p.compile_mode, fullgraph=False) for c in m.controlnets]
            m.extra = {k: torch.compile(v, mode=p.compile_mode, fullgraph=False) for k, v in m.extra.items()}
            m.vae.decoder = torch.compile(m.vae.decoder, mode=p.compile_mode, fullgraph=False)

    # ---- per-record choices --------------------------------------------------------------------------

    def record_choices(self, seed: int) -> tuple[str, float]:
        """The prompt and the CFG scale of a record: drawn from its seed only (never from its batch)."""
        rng = np.random.default_rng([int(seed), 0xC0DE])
        values = {k: self.p.prompt_lists[k][int(rng.integers(len(self.p.prompt_lists[k])))] for k in sorted(self.p.prompt_lists)}
        prompt = self.p.prompt.format_map(values) if values else self.p.prompt
        gs = self.p.guidance_scale
        scale = float(gs[int(rng.integers(len(gs)))]) if isinstance(gs, list) else float(gs)
        return prompt, scale

    def work_size(self, h: int, w: int) -> tuple[int, int]:
        s = self.p.resolution / max(h, w)
        return max(8, int(round(h * s / 8)) * 8), max(8, int(round(w * s / 8)) * 8)

    def _embed(self, prompts: Sequence[str]):
        """Text embeddings, one prompt at a time (cached), so a record's embedding never depends on its batch."""
        import torch

        m = self.m
        for text in dict.fromkeys(prompts):
            if text not in self._embeds:
                ids = m.tokenizer([text], padding="max_length", max_length=m.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids.to(m.device)
                self._embeds[text] = m.text_encoder(ids)[0][0]
                if len(self._embeds) > 4096:
                    self._embeds.pop(next(iter(self._embeds)))
        return torch.stack([self._embeds[t] for t in prompts])

    # ---- masks ---------------------------------------------------------------------------------------

    def make_masks(self, work_u8: np.ndarray) -> np.ndarray:
        """Soft masks (N,h,w) in [0,1] at the working resolution; 1 = redraw."""
        from scipy import ndimage

        mk = self.p.mask
        n, h, w, _ = work_u8.shape
        yy, xx = np.mgrid[0:h, 0:w]
        u, v = (xx + 0.5) / w, (yy + 0.5) / h

        def ellipse(cx, cy, rx, ry):
            return (((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 <= 1.0).astype(np.float32)

        if mk.kind == "full":
            hard = np.ones((n, h, w), np.float32)
        elif mk.kind == "ellipse":
            hard = np.repeat(ellipse(*mk.center, *mk.radii)[None], n, 0)
        elif mk.kind == "box":
            x0, y0, x1, y1 = mk.box
            hard = np.repeat(((u >= x0) & (u < x1) & (v >= y0) & (v < y1)).astype(np.float32)[None], n, 0)
        elif mk.kind == "file":
            from PIL import Image

            with Image.open(mk.path) as im:
                one = np.asarray(im.convert("L").resize((w, h), Image.BILINEAR), np.float32) / 255.0
            hard = np.repeat((one >= 0.5).astype(np.float32)[None], n, 0)
        else:  # detector
            import cv2

            if getattr(self, "_cascade", None) is None:
                self._cascade = cv2.CascadeClassifier(mk.detector_weights)
                if self._cascade.empty():
                    raise ConfigError(f"params.mask.detector_weights: {mk.detector_weights!r} is not a readable cascade file")
            cascade = self._cascade
            hard = np.zeros((n, h, w), np.float32)
            for i, img in enumerate(work_u8):
                faces = cascade.detectMultiScale(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), 1.1, 3)
                for (x, y, fw, fh) in faces:
                    g = 1.0 + mk.margin
                    hard[i] = np.maximum(hard[i], ellipse((x + fw / 2) / w, (y + fh / 2) / h, fw * g / 2 / w, fh * g / 2 / h))
                if not hard[i].any():
                    hard[i] = 1.0 if mk.fallback == "full" else ellipse(*mk.center, *mk.radii)
        if mk.feather > 0 and mk.kind != "full":
            sig = mk.feather * max(h, w)
            return np.clip(ndimage.gaussian_filter(hard, sigma=(0, sig, sig), mode="nearest"), 0, 1).astype(np.float32)
        return hard

    # ---- generation ----------------------------------------------------------------------------------

    def _scheduler(self):
        import diffusers

        name, extra = _SCHEDULERS[self.p.scheduler]
        cfg = {k: v for k, v in self.m.scheduler_config.items() if not k.startswith("_")}
        return getattr(diffusers, name).from_config({**cfg, **extra})

    def _encode(self, x):
        """VAE latents of images in [-1, 1]: the posterior mean (no sampling noise), scaled."""
        m = self.m
        lat = m.vae.encode(x.to(m.dtype)).latent_dist.mean
        return lat.float() * m.vae.config.scaling_factor

    def _generate(self, images: np.ndarray, seeds: list[int], noise_seeds: list[int]) -> tuple[np.ndarray, list[Optional[str]]]:
        import torch

        with torch.inference_mode():
            return self._generate_impl(images, seeds, noise_seeds)

    def _generate_impl(self, images, seeds, noise_seeds):
        import torch

        m, p = self.m, self.p
        dev, dt = m.device, m.dtype
        n, H, W, _ = images.shape
        h, w = self.work_size(H, W)
        f = m.vae_factor
        x_orig = torch.from_numpy(images).to(dev).permute(0, 3, 1, 2).float() / 255.0
        x_work = _resize(x_orig, h, w).clamp(0, 1)
        work_u8 = (x_work * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

        choices = [self.record_choices(s) for s in seeds]
        st = SimpleNamespace(n=n, h=h, w=w, x_work=x_work, work_u8=work_u8, img_lat=None)
        st.gs = torch.tensor([c[1] for c in choices], device=dev, dtype=torch.float32).view(n, 1, 1, 1)
        st.cfg = bool((st.gs > 1.0).any())
        st.pos = self._embed([c[0] for c in choices]).to(dt)
        st.neg = self._embed([p.negative_prompt] * n).to(dt)
        st.emb2 = torch.cat([st.neg, st.pos]) if st.cfg else st.pos
        st.controls = []
        for k, cond in enumerate(self.conditions):
            maps = np.stack([self._maps(cond, im) for im in work_u8])
            t = torch.from_numpy(maps).to(dev).permute(0, 3, 1, 2).to(dt) / 255.0
            st.controls.append((m.controlnets[k], t, cond))

        sched = self._scheduler()
        sched.set_timesteps(p.steps, device=dev)
        timesteps = sched.timesteps
        # per-record noise, drawn on the CPU so that it is the same on every device
        shape = (4, h // f, w // f)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in noise_seeds]).to(dev)

        st.unet_extra = None
        if p.mode in ("img2img", "inpaint"):
            st.img_lat = self._encode(x_work * 2 - 1)
        if p.mode == "inpaint":
            soft = torch.from_numpy(self.make_masks(work_u8)).to(dev)[:, None]
            st.mask_soft = soft
            hard = (soft >= 0.5).float()
            st.mask_lat = torch.nn.functional.interpolate(hard, size=shape[1:], mode="nearest")
            if m.unet_in == 9:
                masked = self._encode((x_work * 2 - 1) * (1 - hard))
                st.unet_extra = torch.cat([st.mask_lat, masked], dim=1)
        self._prepare_extra(st)

        if p.mode != "txt2img" and p.strength < 1.0:
            init = min(int(p.steps * p.strength), p.steps)
            t_start = max(p.steps - init, 0)
            timesteps = timesteps[t_start * sched.order:]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(t_start * sched.order)
            latents = sched.add_noise(st.img_lat, noise, timesteps[:1].repeat(n))
        else:
            latents = noise * sched.init_noise_sigma

        total = len(timesteps)
        for i, t in enumerate(timesteps):
            x = sched.scale_model_input(latents, t)
            eps = self._predict(st, x, t, i, total)
            latents = sched.step(eps, t, latents, return_dict=False)[0]
            if p.mode == "inpaint" and m.unet_in == 4:
                proper = st.img_lat if i == total - 1 else sched.add_noise(st.img_lat, noise, timesteps[i + 1: i + 2].repeat(n))
                latents = (1 - st.mask_lat) * proper + st.mask_lat * latents

        decoded = m.vae.decode((latents / m.vae.config.scaling_factor).to(dt)).sample.float()
        finite = torch.isfinite(decoded).flatten(1).all(1) & torch.isfinite(latents).flatten(1).all(1)
        out = ((decoded.nan_to_num(0.0) + 1) / 2).clamp(0, 1)
        out = torch.where(finite.view(-1, 1, 1, 1), out, torch.zeros_like(out))  # a broken record is black, not gray
        black = out.flatten(1).amax(1) * 255.0 < p.guard.black_level
        out = _resize(out, H, W).clamp(0, 1)
        if p.mode == "inpaint" and p.paste_back:
            keep = _resize(st.mask_soft, H, W).clamp(0, 1)
            out = keep * out + (1 - keep) * x_orig
        u8 = (out * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        reasons = [None if ok and not b else ("NaN/inf" if not ok else "black") for ok, b in zip(finite.tolist(), black.tolist())]
        return u8, reasons

    def _prepare_extra(self, st) -> None:
        """Subclass hook: per-call inputs of extra networks."""

    def _unet_input(self, st, x):
        import torch

        return x if st.unet_extra is None else torch.cat([x, st.unet_extra], dim=1)

    @staticmethod
    def _active(start: float, end: float, i: int, total: int) -> bool:
        """A condition is on at step i when the step lies inside [start, end] of the schedule."""
        return not (i / total < start or (i + 1) / total > end)

    def _control(self, st, x, t, i, total):
        """Summed ControlNet residuals for the (CFG) batch, or (None, None) when no condition is on."""
        import torch

        m = self.m
        down, mid = None, None
        both = st.cfg and self.p.control_uncond
        x_in = torch.cat([x, x]) if both else x
        emb = st.emb2 if both else st.pos
        for net, cond, c in st.controls:
            if not self._active(c.start, c.end, i, total) or c.scale == 0:
                continue
            cimg = torch.cat([cond, cond]) if both else cond
            d, md = net(x_in.to(m.dtype), t, encoder_hidden_states=emb, controlnet_cond=cimg, conditioning_scale=c.scale, return_dict=False)
            down = list(d) if down is None else [a + b for a, b in zip(down, d)]
            mid = md if mid is None else mid + md
        if down is not None and st.cfg and not both:  # uncond half gets no control
            down = [torch.cat([torch.zeros_like(r), r]) for r in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return down, mid

    def _predict(self, st, x, t, i, total):
        """Guided noise prediction at step i: ControlNets, UNet on the CFG pair, then ``_combine``."""
        import torch

        m = self.m
        xu = self._unet_input(st, x)
        down, mid = self._control(st, x, t, i, total)
        u_in = torch.cat([xu, xu]) if st.cfg else xu
        eps = m.unet(u_in.to(m.dtype), t, encoder_hidden_states=st.emb2, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid, return_dict=False)[0].float()
        if st.cfg:
            eps_u, eps_c = eps.chunk(2)
            res_c = (None, None) if down is None else ([r[st.n:] for r in down], mid[st.n:])
        else:
            eps_u, eps_c, res_c = None, eps, (down, mid)
        return self._combine(st, x, t, i, total, eps_u, eps_c, res_c)

    def _combine(self, st, x, t, i, total, eps_u, eps_c, res_c):
        """Classifier-free guidance with a per-record scale: eps = eps_u + g (eps_c - eps_u)."""
        if eps_u is None:
            return eps_c
        return eps_u + st.gs * (eps_c - eps_u)


from anonrisk.anonymize import camouflage  # noqa: E402,F401  (registers "camouflage", which builds on this module)
