"""Diffusion anonymizers: Stable Diffusion (text-to-image, inpainting, img2img) with any set of ControlNets.

One class, one ``__call__``, one denoising loop (``sampler.py``) written over diffusers components
(``diffusion_components.py``), so that every mode shares the same per-record seeding, the same guard and the
same GPU path, and so that ``camouflage.py`` can add a guidance term without copying the loop. The params
are ``diffusion_params.py``; the inpainting masks ``masks.py``; the condition maps ``conditioning.py``.

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
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import numpy as np

from anonrisk.anonymize.base import ANONYMIZERS, Anonymizer, check_batch
from anonrisk.anonymize.conditioning import ConditionMaps
from anonrisk.anonymize.conditions import Condition, check_annotator, parse_condition
from anonrisk.anonymize.diffusion_components import Models, check_location, load_controlnet, load_models, random_arch, unet_in_channels
from anonrisk.anonymize.diffusion_params import OPERATIONAL, DiffusionParams, check_packages
from anonrisk.anonymize.masks import load_cascade, make_masks, validate_mask
from anonrisk.anonymize.sampler import Sampler, record_choices, work_size
from anonrisk.errors import ConfigError

log = logging.getLogger("anonrisk.diffusion")


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


@ANONYMIZERS.register("diffusion")
class DiffusionAnonymizer(Anonymizer):
    """Stable Diffusion + ControlNets; see the module docstring and docs/diffusion.md."""

    version: ClassVar[int] = 1
    device_kind: ClassVar[str] = "gpu"
    Params = DiffusionParams
    kind: ClassVar[str] = "diffusion"
    sampler_cls: ClassVar[type[Sampler]] = Sampler

    def __init__(self, params: DiffusionParams, key: str = ""):
        super().__init__(params, key)
        self.conditions: list[Condition] = [parse_condition(c, i) for i, c in enumerate(self.p.conditions)]
        self.m: Optional[Models] = None
        self.sampler: Optional[Sampler] = None
        self.guard_events: list[GuardEvent] = []
        self._maps: Optional[ConditionMaps] = None
        self._cascade = None  # the face detector of mask kind detector, loaded on first use
        self._validated = False

    # ---- contract ------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        # the params as given (defaults left out), without the operational ones
        params = self.p.model_dump(exclude_unset=True, exclude=set(OPERATIONAL))
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
        in_ch = 9 if (random_arch(p.model) and p.mode == "inpaint") else unet_in_channels(p.model)
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
            validate_mask(p.mask)
        if p.mode != "txt2img" and int(p.steps * p.strength) < 1:
            raise ConfigError(f"params.strength: {p.strength} x {p.steps} steps leaves no denoising step")
        check_packages(p)
        self._validate_extra()
        self._validated = True

    def _validate_extra(self) -> None:
        """Subclass hook."""

    def setup(self, device: str = "cpu") -> None:
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if self.m is not None and self.m.device == dev:
            return
        if not self._validated:
            self.validate()
        self.m = load_models(self.p, self.controlnet_specs(), dev, self._load_extra)
        self._maps = ConditionMaps(self.p.annotator_weights, seed=self.p.random_seed, cache_dir=self.p.condition_cache_dir,
                                   max_bytes=self.p.condition_cache_mb << 20, device=str(dev))
        self.sampler = self.sampler_cls(self.m, self.p, self.conditions, self._maps, self.make_masks)

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

    def _load_controlnet(self, spec: str, index: int, dtype, latent_conditioning: bool = False, seed: Optional[int] = None):
        return load_controlnet(self.p, spec, index, dtype, latent_conditioning, seed)

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

    # ---- per record and per batch --------------------------------------------------------------------

    def record_choices(self, seed: int) -> tuple[str, float]:
        return record_choices(self.p, seed)

    def work_size(self, h: int, w: int) -> tuple[int, int]:
        return work_size(self.p.resolution, h, w)

    def make_masks(self, work_u8: np.ndarray) -> np.ndarray:
        """Soft masks (N,h,w) in [0,1] at the working resolution; 1 = redraw."""
        return make_masks(self.p.mask, work_u8, self._face_detector)

    def _face_detector(self):
        if self._cascade is None:
            self._cascade = load_cascade(self.p.mask)
        return self._cascade

    def _embed(self, prompts: Sequence[str]):
        return self.sampler.embed(prompts)

    def _generate(self, images: np.ndarray, seeds: list[int], noise_seeds: list[int]) -> tuple[np.ndarray, list[Optional[str]]]:
        return self.sampler.generate(images, seeds, noise_seeds)
