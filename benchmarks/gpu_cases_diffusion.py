"""GPU cases of issue 19's kinds, for benchmarks/gpu_check.py to import (each case is a function).

    python benchmarks/gpu_cases_diffusion.py --tiny --device cpu     # a check that every case runs (toy sizes)
    python benchmarks/gpu_cases_diffusion.py --device cuda           # SD 1.5 size, random weights, 512 px

Every case builds its anonymizer with random weights (``random:sd15``, or ``random:tiny`` with ``--tiny``),
times ``n`` images at batch ``batch`` after one warm-up call, and returns img/s beside the stock diffusers
pipeline on the same components, the same initial latents and the same steps, where one exists (a ratio:
ours / stock). Speeds from a shared machine are not results: run it on a quiet GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _faces(n: int, size: int) -> np.ndarray:
    from anonrisk.data.synthetic import render_image

    return np.stack([render_image(0, i, 0, size) for i in range(n)])


def _time(fn, n: int, batch: int, device: str) -> float:
    fn(0, min(batch, n))  # warm-up (kernels, caches)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        fn(i, min(batch, n - i))
    _sync(device)
    return n / (time.perf_counter() - t0)


def _build(kind: str, tiny: bool, device: str, **params):
    from anonrisk.anonymize import ANONYMIZERS

    arch = "random:tiny" if tiny else "random:sd15"
    base = dict(model=arch, steps=4 if tiny else 20, resolution=64 if tiny else 512, guidance_scale=7.5)
    a = ANONYMIZERS.build(kind, **{**base, **params})
    a.validate()
    a.setup(device)
    return a


def _stock(a, faces, seeds, inpaint: bool):
    """A closure running diffusers' stock ControlNet (inpaint) pipeline on ``a``'s components."""
    import torch
    from diffusers import StableDiffusionControlNetInpaintPipeline, StableDiffusionControlNetPipeline
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
    from PIL import Image

    from anonrisk.anonymize.schedulers import make_scheduler

    m, p = a.m, a.p
    cls = StableDiffusionControlNetInpaintPipeline if inpaint else StableDiffusionControlNetPipeline
    net = MultiControlNetModel(m.controlnets) if len(m.controlnets) > 1 else m.controlnets[0]
    pipe = cls(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet, controlnet=net,
               scheduler=make_scheduler(p.scheduler, m.scheduler_config), safety_checker=None, feature_extractor=None,
               requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    res = p.resolution
    controls = [torch.from_numpy(np.stack([a._maps(c, im) for im in faces])).permute(0, 3, 1, 2).float().div(255).to(m.device, m.dtype)
                for c in a.conditions]
    masks = a.make_masks(faces)

    def run(i, b):
        kw = dict(prompt=[p.prompt] * b, negative_prompt=[p.negative_prompt] * b, height=res, width=res, num_inference_steps=p.steps,
                  guidance_scale=7.5, output_type="np", generator=[torch.Generator().manual_seed(int(s)) for s in seeds[i:i + b]])
        ctl = [c[i:i + b] for c in controls]
        ctl = ctl if len(ctl) > 1 else ctl[0]
        with torch.inference_mode():
            if inpaint:
                pipe(image=[Image.fromarray(f) for f in faces[i:i + b]], mask_image=[Image.fromarray((mk * 255).astype(np.uint8)) for mk in masks[i:i + b]],
                     control_image=ctl, **kw)
            else:
                pipe(image=ctl, **kw)

    return run


def _case(name: str, a, inpaint: bool, n: int, batch: int, device: str, stock: bool = True) -> dict:
    size = a.p.resolution
    faces = _faces(n, size)
    seeds = list(range(n))
    ours = _time(lambda i, b: a(faces[i:i + b], seeds[i:i + b]), n, batch, device)
    row = {"case": name, "n": n, "batch": batch, "resolution": size, "steps": a.p.steps, "img_per_s": ours}
    if stock:
        ref = _time(_stock(a, faces, seeds, inpaint), n, batch, device)
        row.update(stock_img_per_s=ref, ratio_to_stock=ours / ref)
    return row


def case_instance_aug_faithful(tiny: bool = False, device: str = "cuda", n: int = 16, batch: int = 8) -> dict:
    """instance-aug-faithful (depth + soft edge ControlNets, inpainting, dlib re-detection) beside the stock
    ControlNet inpaint pipeline with MultiControlNetModel (no re-detection: the check's cost shows in the ratio)."""
    a = _build("instance-aug-faithful", tiny, device, mode="inpaint", conditions=[{"name": "canny", "scale": 0.7}, {"name": "canny", "scale": 0.1}],
               controlnets="random:tiny" if tiny else "random:sd15")
    return _case("instance-aug-faithful", a, True, n, batch, device)


def case_dpmpp_sde_karras(tiny: bool = False, device: str = "cuda", n: int = 16, batch: int = 8) -> dict:
    """The paper's sampler (DPM++ SDE Karras: two UNet passes per step, per-record Brownian trees) with one
    ControlNet, beside the stock ControlNet pipeline with the same scheduler."""
    a = _build("diffusion", tiny, device, scheduler="dpmpp_sde_karras", conditions=[{"name": "canny", "scale": 1.0}],
               controlnets="random:tiny" if tiny else "random:sd15")
    return _case("dpmpp_sde_karras", a, False, n, batch, device)


def case_compel(tiny: bool = False, device: str = "cuda", n: int = 16, batch: int = 8) -> dict:
    """Compel-weighted prompts ("(person)++", a new prompt per record) through the same loop; no stock twin."""
    a = _build("diffusion", tiny, device, prompt_weighting="compel", prompt="(person)++, {style}",
               prompt_lists={"style": [f"style {k}" for k in range(64)]})
    return _case("compel", a, False, n, batch, device, stock=False)


def case_camouflage_light(tiny: bool = False, device: str = "cuda", n: int = 16, batch: int = 8) -> dict:
    """CAMOUFLaGE-Light: IP-Adapter (CLIP ViT-H/14-sized random encoder, written and loaded in the published
    layout) + T2I-Adapter on the attribute encoding, DPM++ SDE Karras; no stock pipeline takes both adapters."""
    arch = "random:tiny" if tiny else "random:sd15"
    a = _build("camouflage-light", tiny, device, ip_adapter=arch, t2i_adapter=arch, scheduler="dpmpp_sde_karras")
    return _case("camouflage-light", a, False, n, batch, device, stock=False)


CASES = {"camouflage-light": case_camouflage_light, "instance-aug-faithful": case_instance_aug_faithful, "dpmpp_sde_karras": case_dpmpp_sde_karras, "compel": case_compel}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="random:tiny at 64 px, 4 steps (a check that the cases run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    n, batch = args.n or (4 if args.tiny else 16), args.batch or (2 if args.tiny else 8)
    rows = [CASES[c](tiny=args.tiny, device=args.device, n=n, batch=batch) for c in args.cases.split(",")]
    for r in rows:
        print(json.dumps(r))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
