"""The diffusers components of a diffusion anonymizer: where models are (local folders, the Hugging Face
cache, ``random:<arch>``), loading them onto a device, and the GPU path (attention backend, channels_last,
fused QKV, torch.compile). Heavy libraries are imported inside functions only."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from anonrisk.anonymize.schedulers import SCHEDULERS  # noqa: F401  (re-exported: the names live in schedulers.py)
from anonrisk.errors import ConfigError

log = logging.getLogger("anonrisk.diffusion")

RANDOM_PREFIX = "random:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


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


def unet_in_channels(spec: str) -> Optional[int]:
    cfg = Path(os.path.expanduser(spec), "unet", "config.json")
    if cfg.is_file():
        import json

        return int(json.loads(cfg.read_text()).get("in_channels", 4))
    return None


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
    attention: str = "sdpa"  # the attention backend optimize actually enabled

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def unet_in(self) -> int:
        return int(self.unet.config.in_channels)

    def modules(self) -> list:
        return [self.unet, self.vae, self.text_encoder, *self.controlnets, *self.extra.values()]


def torch_dtype(name: str, dev):
    import torch

    if name == "auto":
        name = "fp16" if dev.type == "cuda" else "fp32"
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def load_models(p, controlnet_specs: Sequence[str], dev, load_extra: Callable[[Any], dict]) -> Models:
    """Every network of ``p`` (DiffusionParams) on ``dev``, frozen, in eval mode, optimised for the device;
    ``load_extra(dtype)`` adds a subclass's own networks (``Models.extra``)."""
    from anonrisk.weights import own_aligned_

    dtype = torch_dtype(p.dtype, dev)
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
        log.info("loading %s (UNet, text encoder, VAE; can take a minute from a network disk)", kw["pretrained_model_name_or_path"])
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
    controlnets = [load_controlnet(p, spec, i, dtype) for i, spec in enumerate(controlnet_specs)]
    m = Models(dev, dtype, unet, vae, te, tok, sched_cfg, controlnets)
    m.extra = load_extra(dtype)
    for mod in m.modules():
        own_aligned_(mod)  # loaded weights sit unaligned in the file buffer: see weights.own_aligned_
        mod.requires_grad_(False).eval().to(dev)
        if mod.dtype != dtype:
            mod.to(dtype=dtype)
    optimize(m, p)
    return m


def load_controlnet(p, spec: str, index: int, dtype, latent_conditioning: bool = False, seed: Optional[int] = None):
    from anonrisk.anonymize import tiny

    arch = random_arch(spec)
    if arch:
        return tiny.build_controlnet(arch, seed if seed is not None else tiny.controlnet_seed(p.random_seed, index),
                                     latent_conditioning=latent_conditioning)
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(**_local_kwargs(spec, p.allow_download), torch_dtype=dtype)


def optimize(m: Models, p) -> None:
    """Attention backend, channels_last, fused QKV, torch.compile (the GPU path)."""
    import torch

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
    if p.compile:  # compiles lazily: the first batch is slow and silent, later ones fast
        log.info("torch.compile (%s): the first batch compiles the UNet and VAE decoder, typically minutes", p.compile_mode)
        m.unet = torch.compile(m.unet, mode=p.compile_mode, fullgraph=False)
        m.controlnets = [torch.compile(c, mode=p.compile_mode, fullgraph=False) for c in m.controlnets]
        m.extra = {k: torch.compile(v, mode=p.compile_mode, fullgraph=False) for k, v in m.extra.items()}
        m.vae.decoder = torch.compile(m.vae.decoder, mode=p.compile_mode, fullgraph=False)
