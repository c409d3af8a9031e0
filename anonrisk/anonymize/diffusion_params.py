"""The parameters of the diffusion anonymizers (``kind: diffusion``; ``camouflage`` extends them): the
pydantic model the registry validates, so every bad key is one error naming it."""

from __future__ import annotations

import re
from typing import Any, Literal, Optional, Union

from pydantic import Field, ValidationInfo, field_validator

from anonrisk.anonymize.schedulers import SCHEDULER_NAMES
from anonrisk.config.validation import Strict


class MaskSpec(Strict):
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


class GuardSpec(Strict):
    """NaN / black-output guard: retry a bad record with a derived seed, then flag it (or raise)."""

    retries: int = Field(2, ge=0, le=10)
    black_level: float = Field(4.0, ge=0.0, le=255.0)  # an output whose brightest pixel is below this is black
    on_fail: Literal["flag", "raise"] = "flag"


class DiffusionParams(Strict):
    model: str
    mode: Literal["txt2img", "inpaint", "img2img"] = "txt2img"
    conditions: list[Union[str, dict[str, Any]]] = []
    controlnets: Union[str, list[str]] = []  # one per condition, same order; "random:<arch>" = one each
    annotator_weights: dict[str, str] = {}  # annotator -> local weights path, or "random"
    random_seed: int = 0  # seeds random:<arch> weights and random annotators
    vae: Optional[str] = None  # a separate VAE (local dir or hub id)
    scheduler: Literal[SCHEDULER_NAMES] = "unipc"  # usual names: unipc, ddim, euler_a, dpmpp_2m_karras, dpmpp_sde_karras, ...
    steps: int = Field(30, ge=1, le=1000)
    strength: float = Field(1.0, gt=0.0, le=1.0)  # img2img / inpaint: how much noise the original gets
    guidance_scale: Union[float, list[float]] = 7.5  # a list: one value drawn per record
    prompt: str = "a photo of a person"  # {field}s are drawn per record from prompt_lists[field]
    prompt_lists: dict[str, list[str]] = Field({}, validate_default=True)
    negative_prompt: str = ""
    # "compel": Compel's weighting syntax in prompt and negative prompt ("(person)++" = weight 1.1^2 on
    # "person", as in the recipes that used it); "none": the text goes to the tokenizer as written
    prompt_weighting: Literal["none", "compel"] = "none"
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

    @field_validator("prompt_lists")
    @classmethod
    def _prompt_fields(cls, v: dict[str, list[str]], info: ValidationInfo) -> dict[str, list[str]]:
        missing = sorted(set(re.findall(r"{(\w+)}", info.data.get("prompt", ""))) - set(v))
        if missing:
            raise ValueError(f"template field(s) {', '.join(missing)} of params.prompt have no list here")
        if any(not choices for choices in v.values()):
            raise ValueError("every list needs at least one entry")
        return v

    @field_validator("guidance_scale")
    @classmethod
    def _choices(cls, v: Union[float, list[float]]) -> Union[float, list[float]]:
        if isinstance(v, list) and not v:
            raise ValueError("an empty list; give a number or a list of choices")
        return v


#: params that change how fast, not what: kept out of ``describe()`` (and so out of fingerprints)
OPERATIONAL = ("condition_cache_dir", "condition_cache_mb", "allow_download")


def check_packages(p: DiffusionParams) -> None:
    """Unavailable (one line naming the key and the install) when an optional package the params need is missing."""
    import importlib.util

    from anonrisk.anonymize.schedulers import missing_package
    from anonrisk.errors import Unavailable

    pip = missing_package(p.scheduler)
    if pip:
        raise Unavailable(f"params.scheduler: {p.scheduler!r} needs the {pip} package (pip install {pip}, or "
                          f"pip install 'anonrisk[diffusion]'); dpmpp_2m_sde_karras is a multistep SDE sampler without it")
    if p.prompt_weighting == "compel" and importlib.util.find_spec("compel") is None:
        raise Unavailable("params.prompt_weighting: 'compel' needs the compel package (pip install 'anonrisk[compel]')")
