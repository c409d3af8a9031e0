"""Schedulers by their usual names (the A1111 / k-diffusion names), mapped to diffusers classes and options,
and the per-record noise of the stochastic ones.

The mapping follows the table in diffusers' scheduler docs: "DPM++ 2M Karras" is
``DPMSolverMultistepScheduler(use_karras_sigmas=True)``, "DPM++ SDE Karras" is
``DPMSolverSDEScheduler(use_karras_sigmas=True)`` (the single-step SDE sampler with a Brownian-tree noise
sampler, which needs ``torchsde``), "DPM++ 2M SDE Karras" is ``DPMSolverMultistepScheduler(algorithm_type=
"sde-dpmsolver++", use_karras_sigmas=True)``, "Euler a" is ``EulerAncestralDiscreteScheduler``.

Stochastic samplers draw fresh noise at every step. To keep "a batched call equals one-by-one calls", each
record's step noise comes from its own generator (``step_seed``): a list of CPU generators passed to
``step(generator=...)`` (diffusers' ``randn_tensor`` draws row i from generator i), or, for
``DPMSolverSDEScheduler``, one Brownian tree per record (``noise_sampler_seed`` as a list).
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import numpy as np

#: name -> (diffusers class, options over the model's scheduler config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm2_a_karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),  # the old name of dpmpp_2m
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "dpmpp_2s": ("DPMSolverSinglestepScheduler", {}),
    "dpmpp_2s_karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    "dpmpp_sde_karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
}
SCHEDULER_NAMES = tuple(SCHEDULERS)

#: classes that import an optional package: class -> (module, pip name)
NEEDS = {"DPMSolverSDEScheduler": ("torchsde", "torchsde")}


def missing_package(name: str) -> str | None:
    """The pip package a scheduler needs and that is not installed, or None."""
    cls = SCHEDULERS[name][0]
    if cls not in NEEDS:
        return None
    import importlib.util

    module, pip = NEEDS[cls]
    return None if importlib.util.find_spec(module) else pip


def make_scheduler(name: str, base_config: dict):
    """A fresh scheduler ``name`` over the model's scheduler config (its betas, prediction type, ...)."""
    import diffusers

    cls, extra = SCHEDULERS[name]
    cfg = {k: v for k, v in base_config.items() if not k.startswith("_")}
    return getattr(diffusers, cls).from_config({**cfg, **extra})


def step_seed(noise_seed: int) -> int:
    """The seed of a record's step noise (stochastic samplers): derived from its initial-noise seed, so a
    retry with a derived seed also gets new step noise."""
    return int(np.random.SeedSequence([int(noise_seed), 0x57E9]).generate_state(1, np.uint64)[0] >> 1)


def per_record_noise(sched, noise_seeds: Sequence[int]) -> dict[str, Any]:
    """Set up ``sched`` so that its step noise for row i comes from record i alone; returns the keyword
    arguments to pass to every ``sched.step`` call (a list of generators where ``step`` takes one)."""
    seeds = [step_seed(s) for s in noise_seeds]
    if hasattr(sched, "noise_sampler_seed"):  # DPMSolverSDEScheduler: one Brownian tree per record
        sched.noise_sampler_seed = seeds
        sched.noise_sampler = None
    if "generator" in inspect.signature(sched.step).parameters:
        import torch

        return {"generator": [torch.Generator().manual_seed(s) for s in seeds]}
    return {}
