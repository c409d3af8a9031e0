"""The project's denoising loop (``sampler.py``) against diffusers' stock pipelines on the same tiny random
weights, the same initial latents and a fixed CFG scale: equal outputs within 1/255.

The custom loop exists for per-record CFG, ControlNet windows and anonymization guidance; these tests pin
that, with those features at their neutral settings, it is the same sampler as
``StableDiffusionControlNetPipeline`` and ``StableDiffusionControlNetInpaintPipeline`` (two ControlNets
through ``MultiControlNetModel``).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")

import torch  # noqa: E402

from anonrisk.anonymize import ANONYMIZERS  # noqa: E402
from anonrisk.anonymize.schedulers import make_scheduler, step_seed  # noqa: E402
from tests.diffusion_support import one_thread, synthetic_faces  # noqa: E402,F401 (one_thread: autouse here)

SEEDS = [11, 12]


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    return synthetic_faces(2)


def build(**params):
    a = ANONYMIZERS.build("diffusion", **{"model": "random:tiny", "steps": 4, "resolution": 64, "guidance_scale": 6.0,
                                         "prompt": "a photo of a person", "negative_prompt": "blurry", **params})
    a.validate()
    a.setup("cpu")
    return a


def inputs(a, faces):
    """What both loops get: prompt embeddings, control maps (N,3,H,W in [0,1]) and the initial latents."""
    with torch.inference_mode():
        pos = a._embed([a.p.prompt] * len(faces))
        neg = a._embed([a.p.negative_prompt] * len(faces))
    controls = [torch.from_numpy(np.stack([a._maps(c, im) for im in faces])).permute(0, 3, 1, 2).float() / 255 for c in a.conditions]
    latents = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in SEEDS])
    return pos, neg, controls, latents


def assert_within_one_level(ours: np.ndarray, stock: np.ndarray):
    diff = np.abs(ours.astype(np.float64) / 255.0 - stock.astype(np.float64))
    assert diff.max() <= 1 / 255, diff.max() * 255
    assert diff.mean() < 0.5 / 255  # most pixels round to the same level


@pytest.mark.parametrize("scheduler", ["unipc", "dpmpp_2m_karras", "euler_a"])
def test_loop_equals_stock_controlnet_pipeline(scheduler, faces):
    from diffusers import StableDiffusionControlNetPipeline

    a = build(mode="txt2img", conditions=[{"name": "canny", "scale": 0.8}], controlnets="random:tiny", scheduler=scheduler)
    m = a.m
    pos, neg, (control,), latents = inputs(a, faces)
    pipe = StableDiffusionControlNetPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
                                             controlnet=m.controlnets[0], scheduler=make_scheduler(scheduler, m.scheduler_config),
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    # an ancestral sampler's step noise: the same per-record generators our loop derives from each seed
    gens = [torch.Generator().manual_seed(step_seed(s)) for s in SEEDS]
    with torch.inference_mode():
        stock = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, image=control, latents=latents.clone(), height=64, width=64,
                     num_inference_steps=4, guidance_scale=6.0, controlnet_conditioning_scale=0.8, generator=gens,
                     output_type="np").images
    assert_within_one_level(a(faces, SEEDS), stock)


def test_loop_equals_stock_controlnet_inpaint_pipeline_with_two_controlnets(faces, monkeypatch):
    from diffusers import StableDiffusionControlNetInpaintPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
    from PIL import Image

    a = build(mode="inpaint", conditions=[{"name": "canny", "scale": 0.7}, {"name": "lineart", "annotator": "lineart_standard", "scale": 0.3}],
              controlnets="random:tiny", scheduler="unipc", paste_back=False,
              mask={"kind": "box", "box": [0.2, 0.15, 0.8, 0.9], "feather": 0.0})
    m = a.m
    assert m.unet_in == 9
    pos, neg, controls, latents = inputs(a, faces)
    masks = a.make_masks(faces)
    pipe = StableDiffusionControlNetInpaintPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
                                                    controlnet=MultiControlNetModel(m.controlnets), scheduler=make_scheduler("unipc", m.scheduler_config),
                                                    safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    # The one deliberate difference: our loop encodes the masked image with the VAE posterior's mean (no
    # sampling noise, so batch-invariant); the stock pipeline samples the posterior. Same mean here.
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    with torch.inference_mode():
        stock = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, image=[Image.fromarray(f) for f in faces],
                     mask_image=[Image.fromarray((mk * 255).astype(np.uint8)) for mk in masks], control_image=controls,
                     latents=latents.clone(), height=64, width=64, strength=1.0, num_inference_steps=4, guidance_scale=6.0,
                     controlnet_conditioning_scale=[0.7, 0.3], output_type="np").images
    assert_within_one_level(a(faces, SEEDS), stock)
