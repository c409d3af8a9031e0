"""CAMOUFLaGE-style anonymization guidance (arXiv 2403.14790) on top of the ControlNet anonymizer.

The structural ControlNets (depth, normal, segmentation, pose, lineart in the ``camouflage-base`` preset)
keep the scene; an *identity ControlNet*, fed the latent of the original image, pulls the prediction
towards the original person. Anonymization guidance subtracts that pull, classifier-free-guidance style:

    eps_u  = UNet(x_t, negative prompt, R_struct)                     (unconditional branch)
    eps_c  = UNet(x_t, prompt,          R_struct)                     (conditional branch)
    eps_id = UNet(x_t, prompt,          R_struct + R_id(z_orig))      (identity branch)
    eps    = eps_u + g (eps_c - eps_u) - a (eps_id - eps_c)

``g`` is the CFG scale, ``a`` the anonymization scale, ``R_*`` ControlNet residuals, ``z_orig`` the VAE
latent of the original (or its pixels, for an identity ControlNet with a 3-channel hint encoder). With
``a = 0`` this is the plain ControlNet pipeline. The identity branch reuses the conditional branch's
structural residuals (same x_t, same prompt), so it costs one UNet pass and one identity-ControlNet pass
per record and step, only inside ``anonymization_start..anonymization_end``.

No public identity ControlNet exists for SD 1.5: ``identity_controlnet`` is a local folder the user
trained (a ControlNet with ``conditioning_channels: 4`` and a one-stage hint encoder reads latents), or
``random:<arch>`` for tests and throughput.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import Field, model_validator

from anonrisk.anonymize.base import ANONYMIZERS
from anonrisk.anonymize.diffusion import DiffusionAnonymizer
from anonrisk.anonymize.diffusion_components import check_location, random_arch
from anonrisk.anonymize.diffusion_params import DiffusionParams
from anonrisk.anonymize.sampler import DenoiseState, Sampler


class CamouflageParams(DiffusionParams):
    identity_controlnet: str
    identity_scale: float = Field(1.0, ge=0.0)  # conditioning scale of the identity ControlNet
    anonymization_scale: float = Field(2.0, ge=0.0)  # ``a`` above
    anonymization_start: float = Field(0.0, ge=0.0, le=1.0)  # fraction of the steps it is active in
    anonymization_end: float = Field(1.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _window(self):
        if self.anonymization_start >= self.anonymization_end:
            raise ValueError("anonymization_start must be below anonymization_end")
        return self


@dataclass
class CamouflageState(DenoiseState):
    id_cond: Any = None  # the identity ControlNet's input: the original's latent (or pixels)


class CamouflageSampler(Sampler):
    state_cls = CamouflageState

    def prepare_extra(self, st) -> None:
        net = self.m.extra["identity"]
        latent_hint = int(net.config.conditioning_channels) == 4
        if latent_hint:
            if st.img_lat is None:
                st.img_lat = self.encode(st.x_work * 2 - 1)
            st.id_cond = st.img_lat.to(self.m.dtype)
        else:
            st.id_cond = st.x_work.to(self.m.dtype)

    def combine(self, st, x, t, i, total, eps_u, eps_c, res_c):
        eps = super().combine(st, x, t, i, total, eps_u, eps_c, res_c)
        p, m = self.p, self.m
        if p.anonymization_scale == 0 or not self.active(p.anonymization_start, p.anonymization_end, i, total):
            return eps
        d_id, mid_id = m.extra["identity"](x.to(m.dtype), t, encoder_hidden_states=st.pos, controlnet_cond=st.id_cond,
                                           conditioning_scale=p.identity_scale, return_dict=False)
        down, mid = res_c
        down = list(d_id) if down is None else [a + b for a, b in zip(down, d_id)]
        mid = mid_id if mid is None else mid + mid_id
        eps_id = m.unet(self.unet_input(st, x).to(m.dtype), t, encoder_hidden_states=st.pos, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid, return_dict=False)[0].float()
        return eps - p.anonymization_scale * (eps_id - eps_c)


@ANONYMIZERS.register("camouflage")
class CamouflageAnonymizer(DiffusionAnonymizer):
    """ControlNet Stable Diffusion plus anonymization guidance (see the module docstring)."""

    version: ClassVar[int] = 1
    Params = CamouflageParams
    kind: ClassVar[str] = "camouflage"
    sampler_cls = CamouflageSampler

    def _validate_extra(self) -> None:
        check_location(self.p.identity_controlnet, "params.identity_controlnet", self.p.allow_download, "config.json")

    def _load_extra(self, dtype) -> dict:
        from anonrisk.anonymize import tiny

        spec = self.p.identity_controlnet
        seed = tiny.identity_controlnet_seed(self.p.random_seed) if random_arch(spec) else None
        return {"identity": self._load_controlnet(spec, -1, dtype, latent_conditioning=True, seed=seed)}
