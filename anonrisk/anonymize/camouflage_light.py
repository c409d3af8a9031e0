"""CAMOUFLaGE-Light (arXiv 2403.14790): Stable Diffusion with an IP-Adapter and a T2I-Adapter instead of
Base's five ControlNets and identity branch.

- IP-Adapter: the original image through a CLIP vision encoder gives image embeddings that condition the
  UNet's cross-attention beside the prompt (diffusers' IP-Adapter support: ``load_ip_adapter`` from a local
  folder in the published layout ``<dir>/models/ip-adapter_sd15.safetensors`` + ``<dir>/models/image_encoder/``;
  the embeddings go in as ``added_cond_kwargs={"image_embeds": [...]}``, zeros for the CFG branch).
- T2I-Adapter: reads the attribute encoding of ``light_attributes.py`` (40 attributes + 5 keypoints per
  person, one channel each, at the person's position) and adds its features to the UNet's down blocks
  (``down_intrablock_additional_residuals``) during ``adapter_start..adapter_end`` of the steps.

``random:<arch>`` for either writes random weights in the published layout to a cache folder first, so
tests and throughput runs go through the same from-a-local-folder path. Per-record seeds, the guard and
"batched equals one by one" are the diffusion kind's (the encoder and the adapter see each image alone).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import numpy as np
from pydantic import Field

from anonrisk.anonymize import light_attributes as la
from anonrisk.anonymize.base import ANONYMIZERS
from anonrisk.anonymize.diffusion import DiffusionAnonymizer
from anonrisk.anonymize.diffusion_components import random_arch
from anonrisk.anonymize.diffusion_params import DiffusionParams
from anonrisk.anonymize.sampler import DenoiseState, Sampler, resize
from anonrisk.errors import ConfigError

IP_WEIGHTS = "ip-adapter_sd15.safetensors"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_VISION = {"tiny": dict(hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8),
           "sd15": dict(hidden_size=1280, intermediate_size=5120, projection_dim=1024, num_hidden_layers=32, num_attention_heads=16,
                        image_size=224, patch_size=14)}


class LightParams(DiffusionParams):
    ip_adapter: str  # a local folder with models/ip-adapter_sd15.safetensors and models/image_encoder/, or random:<arch>
    ip_adapter_scale: float = Field(0.6, ge=0.0)
    t2i_adapter: str  # a local diffusers T2IAdapter folder (in_channels 45), or random:<arch>
    t2i_scale: float = Field(1.0, ge=0.0)
    adapter_start: float = Field(0.0, ge=0.0, le=1.0)
    adapter_end: float = Field(1.0, ge=0.0, le=1.0)
    attributes: Literal["random", "dlib", "facer"] = "random"
    attributes_weights: Optional[str] = None  # facer: the local weights folder


def random_cache(kind: str, arch: str, seed: int) -> Path:
    root = Path(os.environ.get("ANONRISK_CACHE", Path.home() / ".cache" / "anonrisk")) / "random-adapters"
    return root / f"{kind}-{arch}-{seed}"


def write_random_ip_adapter(folder: Path, unet, arch: str, seed: int) -> Path:
    """Random IP-Adapter weights in the published layout for ``unet`` (one to_k_ip/to_v_ip per cross-attention
    processor, numbered as diffusers' converter reads them) and a random CLIP vision encoder beside them."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if (folder / "models" / IP_WEIGHTS).is_file():
        return folder
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")  # written aside, renamed: never half a folder
    models = tmp / "models"
    models.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**_VISION[arch])).eval().save_pretrained(models / "image_encoder", safe_serialization=True)
    cross, emb = unet.config.cross_attention_dim, _VISION[arch]["projection_dim"]
    state = {"image_proj.proj.weight": torch.randn(cross * 4, emb, generator=g) * emb**-0.5,
             "image_proj.proj.bias": torch.zeros(cross * 4), "image_proj.norm.weight": torch.ones(cross),
             "image_proj.norm.bias": torch.zeros(cross)}
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        block = name.split(".")[0]
        chans = unet.config.block_out_channels
        hidden = chans[-1] if block == "mid_block" else (list(reversed(chans)) if block == "up_blocks" else chans)[int(name.split(".")[1])]
        for kv in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{key}.{kv}.weight"] = torch.randn(hidden, cross, generator=g) * cross**-0.5
        key += 2
    save_file(state, str(models / IP_WEIGHTS))
    try:
        tmp.rename(folder)
    except OSError:  # another process wrote it first: the same bytes
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_t2i_adapter(spec: str, unet, seed: int, dtype):
    from diffusers import T2IAdapter

    arch = random_arch(spec)
    if not arch:
        return T2IAdapter.from_pretrained(os.path.expanduser(spec), torch_dtype=dtype, local_files_only=True)
    import torch

    torch.manual_seed(seed)
    return T2IAdapter(in_channels=la.N_ATTRIBUTES + la.N_KEYPOINTS, channels=list(unet.config.block_out_channels),
                      num_res_blocks=1 if arch == "tiny" else 2, downscale_factor=8, adapter_type="full_adapter").eval()


@dataclass
class LightState(DenoiseState):
    image_embeds: Any = None  # IP-Adapter embeddings (CFG: [zeros; embeds]), (B, 1, D)
    adapter_states: Any = None  # T2I-Adapter features for the UNet batch


class LightSampler(Sampler):
    state_cls = LightState
    extractor: Any = None

    def prepare_extra(self, st) -> None:
        import torch

        m, p = self.m, self.p
        enc = m.extra["image_encoder"]
        size = enc.config.image_size
        px = resize(st.x_work, size, size).clamp(0, 1)
        mean = torch.tensor(CLIP_MEAN, device=px.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=px.device).view(1, 3, 1, 1)
        emb = enc(((px - mean) / std).to(m.dtype)).image_embeds[:, None]
        st.image_embeds = torch.cat([torch.zeros_like(emb), emb]) if st.cfg else emb
        maps = np.stack([la.encode(self.extractor(im), st.h, st.w) for im in st.work_u8])
        feats = m.extra["t2i"](torch.from_numpy(maps).to(m.device, m.dtype))
        feats = [f * p.t2i_scale for f in feats]
        st.adapter_states = [torch.cat([f, f]) for f in feats] if st.cfg else feats

    def predict(self, st, x, t, i, total):
        import torch

        m, p = self.m, self.p
        xu = self.unet_input(st, x)
        u_in = torch.cat([xu, xu]) if st.cfg else xu
        kw = {"added_cond_kwargs": {"image_embeds": [st.image_embeds]}}
        if p.t2i_scale > 0 and self.active(p.adapter_start, p.adapter_end, i, total):
            kw["down_intrablock_additional_residuals"] = list(st.adapter_states)  # the UNet pops from the list
        eps = m.unet(u_in.to(m.dtype), t, encoder_hidden_states=st.emb2, return_dict=False, **kw)[0].float()
        eps_u, eps_c = eps.chunk(2) if st.cfg else (None, eps)
        return self.combine(st, x, t, i, total, eps_u, eps_c, (None, None))


@ANONYMIZERS.register("camouflage-light")
class CamouflageLight(DiffusionAnonymizer):
    """Stable Diffusion + IP-Adapter (the original's CLIP image embedding) + T2I-Adapter (attribute encoding)."""

    version: ClassVar[int] = 1
    Params = LightParams
    kind: ClassVar[str] = "camouflage-light"
    sampler_cls = LightSampler

    def _validate_extra(self) -> None:
        p = self.p
        if p.conditions:
            raise ConfigError("params.conditions: camouflage-light conditions through its adapters; give no ControlNet conditions")
        if p.adapter_start >= p.adapter_end:
            raise ConfigError("params.adapter_start: must be below params.adapter_end")
        if not random_arch(p.ip_adapter):
            d = Path(p.ip_adapter).expanduser() / "models"
            if not (d / IP_WEIGHTS).is_file() or not (d / "image_encoder" / "config.json").is_file():
                raise ConfigError(f"params.ip_adapter: {p.ip_adapter!r} lacks models/{IP_WEIGHTS} or models/image_encoder/config.json "
                                  f"(the h94/IP-Adapter layout)")
        if not random_arch(p.t2i_adapter) and not (Path(p.t2i_adapter).expanduser() / "config.json").is_file():
            raise ConfigError(f"params.t2i_adapter: {p.t2i_adapter!r} is not a local T2IAdapter folder (config.json)")
        la.make_extractor(p.attributes, p.random_seed, p.attributes_weights)  # Unavailable now, not mid-run

    def setup(self, device: str = "cpu") -> None:
        before = self.m
        super().setup(device)
        if self.m is before:
            return
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        p, m = self.p, self.m
        folder = Path(p.ip_adapter).expanduser()
        arch = random_arch(p.ip_adapter)
        if arch:
            seed = int(hashlib.sha256(f"ip{p.random_seed}".encode()).hexdigest()[:8], 16)
            folder = write_random_ip_adapter(random_cache("ip-adapter", arch, seed), m.unet, arch, seed)
        pipe = StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
                                       scheduler=DDIMScheduler.from_config(m.scheduler_config), safety_checker=None,
                                       feature_extractor=None, image_encoder=None, requires_safety_checker=False)
        pipe.load_ip_adapter(str(folder), subfolder="models", weight_name=IP_WEIGHTS, image_encoder_folder="image_encoder",
                             local_files_only=True)
        pipe.set_ip_adapter_scale(p.ip_adapter_scale)
        m.extra["image_encoder"] = pipe.image_encoder
        m.extra["t2i"] = load_t2i_adapter(p.t2i_adapter, m.unet, p.random_seed + 7, m.dtype)
        for mod in (m.unet, *m.extra.values()):
            mod.requires_grad_(False).eval().to(m.device)
            if mod.dtype != m.dtype:
                mod.to(dtype=m.dtype)
        self.sampler.extractor = la.make_extractor(p.attributes, p.random_seed, p.attributes_weights)
