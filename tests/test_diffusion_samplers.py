"""Schedulers by their usual names, per-record noise of the SDE samplers, and Compel prompt weighting
(random tiny weights, 64 px, 2-4 steps, on the CPU)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")

import torch  # noqa: E402

from anonrisk.anonymize import ANONYMIZERS  # noqa: E402
from anonrisk.anonymize.schedulers import SCHEDULERS, make_scheduler  # noqa: E402
from anonrisk.anonymize.tiny import SD_SCHEDULER  # noqa: E402
from tests.diffusion_support import one_thread, synthetic_faces  # noqa: E402,F401 (one_thread: autouse here)


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    return synthetic_faces(4)


def canny(**overrides):
    params = dict(model="random:tiny", mode="txt2img", conditions=[{"name": "canny", "scale": 1.0}], controlnets="random:tiny",
                  steps=3, resolution=64, guidance_scale=7.5)
    a = ANONYMIZERS.build("diffusion", **{**params, **overrides})
    a.validate()
    a.setup("cpu")
    return a


# the usual (A1111 / k-diffusion) names and what diffusers' scheduler docs map them to; written out here,
# independently of the module's table
EXPECTED = {
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2_a_karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {"use_karras_sigmas": False}),
    "dpmpp_sde_karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),  # the old name keeps its meaning
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_scheduler_names_map_to_the_diffusers_classes(name):
    cls, flags = EXPECTED[name]
    s = make_scheduler(name, {"_class_name": "PNDMScheduler", **SD_SCHEDULER})
    assert type(s).__name__ == cls
    for k, v in flags.items():
        assert s.config[k] == v, (k, s.config[k])
    # the model's noise schedule is carried over, whatever the class
    assert (s.config.beta_schedule, s.config.beta_start, s.config.beta_end) == ("scaled_linear", 0.00085, 0.012)


def test_karras_sigmas_follow_the_karras_formula():
    s = make_scheduler("dpmpp_sde_karras", SD_SCHEDULER)
    s.set_timesteps(5)
    plain = make_scheduler("dpmpp_sde", SD_SCHEDULER)
    plain.set_timesteps(5)
    sig = np.unique(s.sigmas.numpy())[::-1]
    sig = sig[sig > 0]
    alphas = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)
    full = ((1 - alphas) / alphas) ** 0.5
    lo, hi, rho = full[0], full[-1], 7.0
    ramp = np.linspace(0, 1, 5)
    karras = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho  # Karras et al. 2022, eq. 5
    np.testing.assert_allclose(sig, karras, rtol=1e-4)
    assert not np.allclose(np.unique(plain.sigmas.numpy())[::-1][:5], karras, rtol=1e-2)


def test_every_named_scheduler_runs_in_the_loop(faces):
    a = canny(conditions=[], controlnets=[], steps=1, resolution=16)
    for name in SCHEDULERS:
        a.p = a.sampler.p = a.p.model_copy(update={"scheduler": name})
        out = a(faces[:1], [5])
        assert out.shape == faces[:1].shape and not a.flagged, name


@pytest.mark.parametrize("name", ["dpmpp_sde_karras", "dpmpp_2m_sde_karras", "euler_a"])
def test_sde_sampler_batched_call_equals_one_by_one(name, faces):
    a = canny(scheduler=name, steps=3)
    seeds = [101, 202, 303]
    batched = a(faces[:3], seeds).astype(int)
    single = np.concatenate([a(faces[i:i + 1], [s]) for i, s in enumerate(seeds)]).astype(int)
    reversed_ = a(faces[:3][::-1], seeds[::-1])[::-1].astype(int)
    for other in (single, reversed_):
        diff = np.abs(batched - other)
        assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())
    assert np.array_equal(a(faces[:3], seeds), batched)  # deterministic: no batch-wide random seed
    # the step noise is real (the SDE differs from its deterministic twin) and comes from the record's seed
    twin = {"dpmpp_sde_karras": "dpmpp_2m_karras", "dpmpp_2m_sde_karras": "dpmpp_2m_karras", "euler_a": "euler"}[name]
    det = canny(scheduler=twin, steps=3)(faces[:2], seeds[:2]).astype(int)
    assert np.abs(det - batched[:2]).mean() > 0.5


def test_sde_step_noise_is_drawn_per_record():
    from anonrisk.anonymize.schedulers import per_record_noise, step_seed

    s = make_scheduler("dpmpp_sde_karras", SD_SCHEDULER)
    kw = per_record_noise(s, [7, 8])
    assert kw == {} and s.noise_sampler_seed == [step_seed(7), step_seed(8)]  # one Brownian tree per record
    e = make_scheduler("euler_a", SD_SCHEDULER)
    gens = per_record_noise(e, [7, 8])["generator"]
    assert [g.initial_seed() for g in gens] == [step_seed(7), step_seed(8)]
    assert len({step_seed(7), step_seed(8), 7, 8}) == 4  # step noise is not the initial noise


# ---- Compel prompt weighting --------------------------------------------------------------------------


def test_compel_weighting_scales_exactly_the_weighted_tokens():
    pytest.importorskip("compel")
    weighted = canny(prompt_weighting="compel", conditions=[], controlnets=[])
    plain = canny(conditions=[], controlnets=[])
    text = "person, a photo"
    with torch.inference_mode():
        z = plain.sampler.embed([text])[0]
        z_compel_plain = weighted.sampler.embed([text])[0]
        z_w = weighted.sampler.embed(["(person)++, a photo"])[0]
        z_empty = plain.sampler.embed([""])[0]
    assert torch.equal(z_compel_plain, z)  # no weights: Compel's embedding is the plain one
    ids = plain.m.tokenizer(text).input_ids  # the toy tokenizer: one token per character, after <start>
    person = list(range(1, 1 + len("person")))
    assert plain.m.tokenizer.decode(ids[person[0]:person[-1] + 1]).replace(" ", "") == "person"
    changed = (z_w != z).any(-1).nonzero().flatten().tolist()
    assert changed == person  # "(person)++" changes the six tokens of "person" and nothing else
    # ... by Compel's rule: away from the empty prompt's embedding by the weight 1.1 ** 2
    expected = z_empty[person] + (z[person] - z_empty[person]) * 1.1**2
    torch.testing.assert_close(z_w[person], expected, rtol=1e-5, atol=1e-5)


def test_compel_weighting_changes_the_image_and_needs_the_package(faces, monkeypatch):
    pytest.importorskip("compel")
    a = canny(prompt="(person)++, a photo", prompt_weighting="compel")
    b = canny(prompt="(person)++, a photo")  # unweighted: the brackets and pluses are just characters
    assert np.abs(a(faces[:1], [3]).astype(int) - b(faces[:1], [3])).mean() > 0.5
    import importlib.util

    from anonrisk.errors import Unavailable

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *x: None if n in ("compel", "torchsde") else real(n, *x))
    with pytest.raises(Unavailable, match=r"params\.prompt_weighting: 'compel' needs the compel package"):
        ANONYMIZERS.build("diffusion", model="random:tiny", prompt_weighting="compel").validate()
    with pytest.raises(Unavailable, match=r"params\.scheduler: 'dpmpp_sde_karras' needs the torchsde package"):
        ANONYMIZERS.build("diffusion", model="random:tiny", scheduler="dpmpp_sde_karras").validate()
