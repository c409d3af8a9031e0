"""Random-weight Stable Diffusion components built from configs: ``tiny`` for tests and the quickstart,
``sd15`` (the SD 1.5 architecture) for throughput benchmarks, whose compute does not depend on weights.

Everything is deterministic from a seed (each component is built under its own forked RNG), needs no
download, and can be written to a local directory in the diffusers layout (``save_random_model``) so that
the from-a-local-directory path is exercised exactly like a user's real weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ARCHS = ("tiny", "sd15")

#: the scheduler configuration of SD 1.5 (scaled-linear betas, epsilon prediction)
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

_UNET = {
    "tiny": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
        sample_size=8,
    ),
    "sd15": dict(
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
        sample_size=64,
    ),
}
_VAE = {
    "tiny": dict(
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
    ),
    "sd15": dict(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        norm_num_groups=32,
        latent_channels=4,
        sample_size=512,
    ),
}
_TEXT = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "sd15": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
}
#: the ControlNet hint encoder: one stride-2 stage per entry after the first (8x for the VAE above)
_CN_EMBED = {"tiny": (8, 16, 16, 16), "sd15": (16, 32, 96, 256)}


def _check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise ValueError(f"unknown random architecture {arch!r}; known: {', '.join(ARCHS)}")
    return arch


def _seeded(seed: int):
    import torch

    ctx = torch.random.fork_rng(devices=[])
    ctx.__enter__()
    torch.manual_seed(seed)
    return ctx


def _build(seed: int, factory):
    ctx = _seeded(seed)
    try:
        return factory()
    finally:
        ctx.__exit__(None, None, None)


def byte_symbols() -> list[str]:
    """CLIP's byte-level alphabet: printable bytes stand for themselves, the rest map to code points 256+."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def toy_tokenizer(max_length: int = 77):
    """A CLIP tokenizer with no merges: the 256 byte symbols, the same ending a word, and the two specials
    (514 ids). Prompts become one token per character; enough to drive a random text encoder."""
    from transformers import CLIPTokenizer

    symbols = byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _reinit_zero_convs(controlnet, seed: int, std: float) -> None:
    """ControlNets start with zero convolutions (no effect); random ones get small weights so that a
    condition actually changes the output in tests."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    emb = controlnet.controlnet_cond_embedding
    with torch.no_grad():
        # hint encoder: variance-preserving (He) init, so that the map's content reaches the residuals
        for m in [emb.conv_in, *emb.blocks, emb.conv_out]:
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            m.bias.zero_()
        for m in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)


def build_controlnet(arch: str, seed: int, *, latent_conditioning: bool = False):
    """A random ControlNet matching ``build_components(arch)``'s UNet. ``latent_conditioning`` makes its hint
    encoder take a 4-channel latent at latent resolution (the identity ControlNet of anonymization guidance)."""
    from diffusers import ControlNetModel

    u = _UNET[_check_arch(arch)]
    embed = (_CN_EMBED[arch][-1],) if latent_conditioning else _CN_EMBED[arch]

    def make():
        cn = ControlNetModel(
            in_channels=4,
            conditioning_channels=4 if latent_conditioning else 3,
            block_out_channels=u["block_out_channels"],
            layers_per_block=u["layers_per_block"],
            down_block_types=u["down_block_types"],
            cross_attention_dim=u["cross_attention_dim"],
            attention_head_dim=u["attention_head_dim"],
            norm_num_groups=u["norm_num_groups"],
            conditioning_embedding_out_channels=embed,
        )
        if arch == "tiny":
            _reinit_zero_convs(cn, seed + 7919, std=0.3)
        return cn.eval()

    return _build(seed, make)


def build_components(arch: str = "tiny", seed: int = 0, *, unet_in_channels: int = 4) -> dict[str, Any]:
    """Random ``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and ``scheduler_config`` of an architecture."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    _check_arch(arch)
    tokenizer = toy_tokenizer()
    unet = _build(seed, lambda: UNet2DConditionModel(in_channels=unet_in_channels, out_channels=4, **_UNET[arch]).eval())
    vae = _build(
        seed + 1,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(_VAE[arch]["block_out_channels"]),
            up_block_types=("UpDecoderBlock2D",) * len(_VAE[arch]["block_out_channels"]),
            **_VAE[arch],
        ).eval(),
    )
    text_cfg = CLIPTextConfig(
        vocab_size=len(tokenizer) if arch == "tiny" else 49408,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **_TEXT[arch],
    )
    text_encoder = _build(seed + 2, lambda: CLIPTextModel(text_cfg).eval())
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler_config": dict(SD_SCHEDULER),
    }


def save_random_model(
    path: str | Path,
    arch: str = "tiny",
    seed: int = 0,
    *,
    inpaint: bool = False,
    controlnets: int = 0,
    controlnet_seeds: list[int] | None = None,
    identity_controlnet: bool = False,
) -> dict[str, Any]:
    """Write a random model in the diffusers layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/,
    model_index.json) plus ``controlnet_<k>/`` folders. Returns the params that point an anonymizer at it.
    ``controlnet_seeds`` default to what ``random:<arch>`` ControlNets use, so the saved model equals the
    in-memory one."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    path = Path(path)
    comp = build_components(arch, seed, unet_in_channels=9 if inpaint else 4)
    pipe = StableDiffusionPipeline(
        vae=comp["vae"],
        text_encoder=comp["text_encoder"],
        tokenizer=comp["tokenizer"],
        unet=comp["unet"],
        scheduler=DDIMScheduler(**comp["scheduler_config"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    # the scheduler file as SD 1.5 ships it (a saved scheduler object would add its class's defaults,
    # e.g. timestep_spacing, which other scheduler classes then inherit through from_config)
    (path / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "PNDMScheduler", **SD_SCHEDULER, "skip_prk_steps": True}, indent=2) + "\n"
    )
    seeds = controlnet_seeds or [controlnet_seed(seed, k) for k in range(controlnets)]
    out: dict[str, Any] = {"model": str(path), "controlnets": []}
    for k, s in enumerate(seeds):
        d = path / f"controlnet_{k}"
        build_controlnet(arch, s).save_pretrained(d, safe_serialization=True)
        out["controlnets"].append(str(d))
    if identity_controlnet:
        d = path / "controlnet_identity"
        build_controlnet(arch, identity_controlnet_seed(seed), latent_conditioning=True).save_pretrained(d, safe_serialization=True)
        out["identity_controlnet"] = str(d)
    (path / "anonrisk_random.json").write_text(json.dumps({"arch": arch, "seed": seed, "inpaint": inpaint}) + "\n")
    return out


def controlnet_seed(seed: int, index: int) -> int:
    return seed + 100 + index


def identity_controlnet_seed(seed: int) -> int:
    return seed + 99
