"""The denoising loop of the diffusion anonymizers, written over diffusers components (UNet, ControlNets,
VAE, CLIP text encoder, a scheduler) so every mode shares the per-record seeding and the GPU path.

``Sampler.generate`` works on one batch: per-record prompts and CFG scales (from the record seed), condition
maps at the working resolution, the initial noise drawn on the CPU per record, then the loop. The state of
one call is a typed ``DenoiseState``; a subclass (``camouflage.py``) adds a guidance term through two hooks,
``prepare_extra`` and ``combine``, without copying the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Sequence

import numpy as np

from anonrisk.anonymize.diffusion_components import Models
from anonrisk.anonymize.schedulers import make_scheduler, per_record_noise


def record_choices(p, seed: int) -> tuple[str, float]:
    """The prompt and the CFG scale of a record: drawn from its seed only (never from its batch)."""
    rng = np.random.default_rng([int(seed), 0xC0DE])
    values = {k: p.prompt_lists[k][int(rng.integers(len(p.prompt_lists[k])))] for k in sorted(p.prompt_lists)}
    prompt = p.prompt.format_map(values) if values else p.prompt
    gs = p.guidance_scale
    scale = float(gs[int(rng.integers(len(gs)))]) if isinstance(gs, list) else float(gs)
    return prompt, scale


def work_size(resolution: int, h: int, w: int) -> tuple[int, int]:
    """The working resolution: the longest side at ``resolution``, both sides multiples of 8."""
    s = resolution / max(h, w)
    return max(8, int(round(h * s / 8)) * 8), max(8, int(round(w * s / 8)) * 8)


def resize(x, h: int, w: int):
    """Bicubic resize with antialiasing of a float (N,C,H,W) batch (per image, so batch-invariant)."""
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == (h, w):
        return x
    return F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)


@dataclass
class DenoiseState:
    """What one ``generate`` call knows: set up once, read by every step (tensors on the models' device)."""

    n: int
    h: int
    w: int
    x_work: Any  # the originals at the working resolution, float (N,3,h,w) in [0, 1]
    work_u8: np.ndarray  # the same as uint8 (N,h,w,3): what the annotators and the mask detector see
    gs: Any  # per-record CFG scale (N,1,1,1)
    cfg: bool  # whether any record uses classifier-free guidance
    pos: Any  # prompt embeddings
    neg: Any  # negative-prompt embeddings
    emb2: Any  # [neg; pos] with CFG, else pos
    controls: list = field(default_factory=list)  # (ControlNet, its condition image, its Condition)
    img_lat: Any = None  # latents of the originals (img2img, inpaint, or a hook that needs them)
    unet_extra: Any = None  # a 9-channel inpainting UNet's extra input: mask + masked-image latents
    mask_soft: Any = None  # inpaint: the soft mask at the working resolution
    mask_lat: Any = None  # inpaint: the hard mask at the latent resolution


class Sampler:
    """The loop over one anonymizer's loaded components (``Models``) and its params."""

    state_cls: ClassVar[type[DenoiseState]] = DenoiseState

    def __init__(self, m: Models, p, conditions: Sequence, maps: Callable, masks: Callable[[np.ndarray], np.ndarray]):
        self.m, self.p, self.conditions, self.maps, self.masks = m, p, list(conditions), maps, masks
        self._embeds: dict[str, Any] = {}
        self._compel = None

    def embed(self, prompts: Sequence[str]):
        """Text embeddings, one prompt at a time (cached), so a record's embedding never depends on its batch."""
        import torch

        for text in dict.fromkeys(prompts):
            if text not in self._embeds:
                self._embeds[text] = self._encode(text)
                if len(self._embeds) > 4096:
                    self._embeds.pop(next(iter(self._embeds)))
        return torch.stack([self._embeds[t] for t in prompts])

    def _encode(self, text: str):
        """(tokens, dim) embedding of one prompt: CLIP's last hidden state, padded to the model's length;
        with ``prompt_weighting: compel`` Compel parses the weights and scales those tokens' embeddings."""
        m = self.m
        if self.p.prompt_weighting == "compel":
            if self._compel is None:
                from compel import Compel

                self._compel = Compel(tokenizer=m.tokenizer, text_encoder=m.text_encoder, truncate_long_prompts=True)
            return self._compel(text)[0]
        ids = m.tokenizer([text], padding="max_length", max_length=m.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids.to(m.device)
        return m.text_encoder(ids)[0][0]

    def scheduler(self):
        return make_scheduler(self.p.scheduler, self.m.scheduler_config)

    def encode(self, x):
        """VAE latents of images in [-1, 1]: the posterior mean (no sampling noise), scaled."""
        m = self.m
        lat = m.vae.encode(x.to(m.dtype)).latent_dist.mean
        return lat.float() * m.vae.config.scaling_factor

    def generate(self, images: np.ndarray, seeds: list[int], noise_seeds: list[int]) -> tuple[np.ndarray, list[Optional[str]]]:
        """(uint8 outputs, per record None or why it is bad: "NaN/inf" or "black")."""
        import torch

        with torch.inference_mode():
            return self._generate(images, seeds, noise_seeds)

    def _generate(self, images, seeds, noise_seeds):
        import torch

        m, p = self.m, self.p
        dev, dt = m.device, m.dtype
        n, H, W, _ = images.shape
        h, w = work_size(p.resolution, H, W)
        f = m.vae_factor
        x_orig = torch.from_numpy(images).to(dev).permute(0, 3, 1, 2).float() / 255.0
        x_work = resize(x_orig, h, w).clamp(0, 1)
        work_u8 = (x_work * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

        choices = [record_choices(p, s) for s in seeds]
        gs = torch.tensor([c[1] for c in choices], device=dev, dtype=torch.float32).view(n, 1, 1, 1)
        cfg = bool((gs > 1.0).any())
        pos = self.embed([c[0] for c in choices]).to(dt)
        neg = self.embed([p.negative_prompt] * n).to(dt)
        st = self.state_cls(n=n, h=h, w=w, x_work=x_work, work_u8=work_u8, gs=gs, cfg=cfg, pos=pos, neg=neg,
                            emb2=torch.cat([neg, pos]) if cfg else pos)
        for k, cond in enumerate(self.conditions):
            maps = np.stack([self.maps(cond, im) for im in work_u8])
            t = torch.from_numpy(maps).to(dev).permute(0, 3, 1, 2).to(dt) / 255.0
            st.controls.append((m.controlnets[k], t, cond))

        sched = self.scheduler()
        sched.set_timesteps(p.steps, device=dev)
        timesteps = sched.timesteps
        # per-record noise, drawn on the CPU so that it is the same on every device
        shape = (4, h // f, w // f)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in noise_seeds]).to(dev)

        if p.mode in ("img2img", "inpaint"):
            st.img_lat = self.encode(x_work * 2 - 1)
        if p.mode == "inpaint":
            soft = torch.from_numpy(self.masks(work_u8)).to(dev)[:, None]
            st.mask_soft = soft
            hard = (soft >= 0.5).float()
            st.mask_lat = torch.nn.functional.interpolate(hard, size=shape[1:], mode="nearest")
            if m.unet_in == 9:
                masked = self.encode((x_work * 2 - 1) * (1 - hard))
                st.unet_extra = torch.cat([st.mask_lat, masked], dim=1)
        self.prepare_extra(st)

        if p.mode != "txt2img" and p.strength < 1.0:
            init = min(int(p.steps * p.strength), p.steps)
            t_start = max(p.steps - init, 0)
            timesteps = timesteps[t_start * sched.order:]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(t_start * sched.order)
            latents = sched.add_noise(st.img_lat, noise, timesteps[:1].repeat(n))
        else:
            latents = noise * sched.init_noise_sigma

        total = len(timesteps)
        step_kw = per_record_noise(sched, noise_seeds)  # stochastic samplers: each record's own step noise
        for i, t in enumerate(timesteps):
            x = sched.scale_model_input(latents, t)
            eps = self.predict(st, x, t, i, total)
            latents = sched.step(eps, t, latents, return_dict=False, **step_kw)[0]
            if p.mode == "inpaint" and m.unet_in == 4:
                proper = st.img_lat if i == total - 1 else sched.add_noise(st.img_lat, noise, timesteps[i + 1: i + 2].repeat(n))
                latents = (1 - st.mask_lat) * proper + st.mask_lat * latents

        decoded = m.vae.decode((latents / m.vae.config.scaling_factor).to(dt)).sample.float()
        finite = torch.isfinite(decoded).flatten(1).all(1) & torch.isfinite(latents).flatten(1).all(1)
        out = ((decoded.nan_to_num(0.0) + 1) / 2).clamp(0, 1)
        out = torch.where(finite.view(-1, 1, 1, 1), out, torch.zeros_like(out))  # a broken record is black, not gray
        black = out.flatten(1).amax(1) * 255.0 < p.guard.black_level
        out = resize(out, H, W).clamp(0, 1)
        if p.mode == "inpaint" and p.paste_back:
            keep = resize(st.mask_soft, H, W).clamp(0, 1)
            out = keep * out + (1 - keep) * x_orig
        u8 = (out * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        reasons = [None if ok and not b else ("NaN/inf" if not ok else "black") for ok, b in zip(finite.tolist(), black.tolist())]
        return u8, reasons

    def prepare_extra(self, st: DenoiseState) -> None:
        """Subclass hook: per-call inputs of extra networks."""

    def unet_input(self, st: DenoiseState, x):
        import torch

        return x if st.unet_extra is None else torch.cat([x, st.unet_extra], dim=1)

    @staticmethod
    def active(start: float, end: float, i: int, total: int) -> bool:
        """A condition is on at step i when the step lies inside [start, end] of the schedule."""
        return not (i / total < start or (i + 1) / total > end)

    def control(self, st: DenoiseState, x, t, i, total):
        """Summed ControlNet residuals for the (CFG) batch, or (None, None) when no condition is on."""
        import torch

        m = self.m
        down, mid = None, None
        both = st.cfg and self.p.control_uncond
        x_in = torch.cat([x, x]) if both else x
        emb = st.emb2 if both else st.pos
        for net, cond, c in st.controls:
            if not self.active(c.start, c.end, i, total) or c.scale == 0:
                continue
            cimg = torch.cat([cond, cond]) if both else cond
            d, md = net(x_in.to(m.dtype), t, encoder_hidden_states=emb, controlnet_cond=cimg, conditioning_scale=c.scale, return_dict=False)
            down = list(d) if down is None else [a + b for a, b in zip(down, d)]
            mid = md if mid is None else mid + md
        if down is not None and st.cfg and not both:  # uncond half gets no control
            down = [torch.cat([torch.zeros_like(r), r]) for r in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return down, mid

    def predict(self, st: DenoiseState, x, t, i, total):
        """Guided noise prediction at step i: ControlNets, UNet on the CFG pair, then ``combine``."""
        import torch

        m = self.m
        xu = self.unet_input(st, x)
        down, mid = self.control(st, x, t, i, total)
        u_in = torch.cat([xu, xu]) if st.cfg else xu
        eps = m.unet(u_in.to(m.dtype), t, encoder_hidden_states=st.emb2, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid, return_dict=False)[0].float()
        if st.cfg:
            eps_u, eps_c = eps.chunk(2)
            res_c = (None, None) if down is None else ([r[st.n:] for r in down], mid[st.n:])
        else:
            eps_u, eps_c, res_c = None, eps, (down, mid)
        return self.combine(st, x, t, i, total, eps_u, eps_c, res_c)

    def combine(self, st: DenoiseState, x, t, i, total, eps_u, eps_c, res_c):
        """Classifier-free guidance with a per-record scale: eps = eps_u + g (eps_c - eps_u)."""
        if eps_u is None:
            return eps_c
        return eps_u + st.gs * (eps_c - eps_u)
