"""Throughput of the diffusion anonymizer beside a bare diffusers loop and the compute floor.

    python benchmarks/anonymize_throughput.py --device cuda --size sd15 --batch-sizes 1,8,16,24 --steps 20 \
        --compile --fuse-qkv            # the GPU figure (random weights: compute does not depend on them)
    python benchmarks/anonymize_throughput.py --device cpu --size tiny   # the CPU record at tiny size

What is measured, in one process and on the same device:
- ``anonymizer``: ``DiffusionAnonymizer.__call__`` (text-to-image, one canny ControlNet, CFG 7.5, UniPC,
  ``--steps`` steps) on uint8 images at the working resolution, random weights of the chosen size.
- ``bare``: ``StableDiffusionControlNetPipeline.__call__`` (eager, default attention) on the same work:
  prompt embeddings, the same control maps, one generator per image, numpy output.
- ``camouflage`` (``--camouflage-batch``): five ControlNets (lineart off after half the steps) plus the
  identity branch of anonymization guidance, to compare with one ControlNet per image.
- the compute floor: FLOPs of one CFG step (UNet + ControlNet on the pair) and one VAE decode, counted with
  ``torch.utils.flop_counter.FlopCounterMode`` on the meta device, divided into the dense matmul
  throughput measured here (fp16 on CUDA, fp32 on the CPU).
Condition maps are computed in a warm-up call and come from the content-hash cache in timed calls (both
paths get the same maps), so the figures are the diffusion path's. Results are merged into
``results/benchmarks/anonymize_throughput.json`` (one entry per device and size) and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--size", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--batch-sizes", default=None, help="comma separated (default: 1,4,8,16 tiny; 1,8,16 sd15)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default 64 tiny, 512 sd15)")
    ap.add_argument("--iters", type=int, default=3, help="timed calls per batch size")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per batch size (more with --compile)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    ap.add_argument("--attention", default="auto", choices=["auto", "sdpa", "xformers"])
    ap.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--compile-mode", default="default")
    ap.add_argument("--fuse-qkv", action="store_true")
    ap.add_argument("--no-control-uncond", action="store_true", help="ControlNets on the conditional branch only")
    ap.add_argument("--skip-bare", action="store_true")
    ap.add_argument("--camouflage-batch", type=int, default=None, help="batch size for the five-ControlNet run (0: skip)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    ap.add_argument("--out", default=str(REPO / "results" / "benchmarks"))
    return ap.parse_args(argv)


# ---- helpers ----------------------------------------------------------------------------------------------


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_matmul_flops(device, dtype) -> float:
    """Dense matmul throughput (FLOP/s) measured on this device: the denominator of the compute floor."""
    import torch

    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def count_flops(size: str, res: int, steps: int, control_uncond: bool = True) -> dict:
    """FLOPs per image: one CFG step (UNet + ControlNet on the pair), one VAE decode, and the camouflage step
    (five ControlNets, lineart on half the steps, plus the identity branch), counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from anonrisk.anonymize import tiny

    lat = res // 8

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops()

    with torch.device("meta"):
        comp = tiny.build_components(size, 0)
        cn = tiny.build_controlnet(size, 1)
        idcn = tiny.build_controlnet(size, 2, latent_conditioning=True)
        unet, vae = comp["unet"], comp["vae"]
        dim = unet.config.cross_attention_dim
        t = torch.tensor(500)
        x2, e2, c2 = torch.randn(2, 4, lat, lat), torch.randn(2, 77, dim), torch.rand(2, 3, res, res)
        x1, e1 = x2[:1], e2[:1]
        cn_pair = flops(lambda: cn(x2, t, e2, c2, return_dict=False)) * (1.0 if control_uncond else 0.5)
        unet_pair = flops(lambda: unet(x2, t, e2, return_dict=False))
        unet_one = flops(lambda: unet(x1, t, e1, return_dict=False))
        id_one = flops(lambda: idcn(x1, t, e1, torch.randn(1, 4, lat, lat), return_dict=False))
        vae_dec = flops(lambda: vae.decode(torch.randn(1, 4, lat, lat)))
    step = unet_pair + cn_pair
    cam_step = unet_pair + 4.5 * cn_pair + unet_one + id_one  # lineart (1 of 5) active on half the steps
    per_image = steps * step + vae_dec
    cam_image = steps * cam_step + vae_dec
    return {
        "step_cfg_pair": step, "unet_cfg_pair": unet_pair, "controlnet_cfg_pair": cn_pair, "vae_decode": vae_dec,
        "per_image": per_image, "camouflage_step": cam_step, "camouflage_per_image": cam_image,
        "camouflage_over_one_controlnet": cam_image / per_image,
    }


def make_images(n: int, res: int):
    import numpy as np
    from PIL import Image

    from anonrisk.data.synthetic import render_image

    faces = [render_image(0, i, 0, 64) for i in range(n)]
    return np.stack([np.asarray(Image.fromarray(f).resize((res, res), Image.BICUBIC)) for f in faces])


def time_calls(fn, warmup: int, iters: int, device) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def anonymizer_params(args, size: str, res: int) -> dict:
    return dict(
        model=f"random:{size}", mode="txt2img", conditions=[{"name": "canny", "scale": 1.0}], controlnets=f"random:{size}",
        scheduler="unipc", steps=args.steps, guidance_scale=7.5, resolution=res, prompt="a photo of a person",
        negative_prompt="blurry", dtype=args.dtype, attention=args.attention,
        channels_last={"auto": "auto", "on": True, "off": False}[args.channels_last], compile=args.compile,
        compile_mode=args.compile_mode, fuse_qkv=args.fuse_qkv, control_uncond=not args.no_control_uncond,
        guard={"retries": 0, "on_fail": "flag"},
    )


def bare_pipeline(anon, fresh: bool):
    """diffusers' ControlNet pipeline over eager modules: the anonymizer's own when it left them untouched,
    else a fresh random set of the same architecture."""
    from diffusers import StableDiffusionControlNetPipeline, UniPCMultistepScheduler

    from anonrisk.anonymize import tiny

    m = anon.m
    if fresh:
        size = anon.p.model.split(":", 1)[1]
        comp = tiny.build_components(size, 0)
        unet, vae, te, tok = comp["unet"], comp["vae"], comp["text_encoder"], comp["tokenizer"]
        cn = tiny.build_controlnet(size, 1)
        for mod in (unet, vae, te, cn):
            mod.to(m.device, m.dtype).requires_grad_(False)
    else:
        unet, vae, te, tok, cn = m.unet, m.vae, m.text_encoder, m.tokenizer, m.controlnets[0]
    pipe = StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=unet, controlnet=cn,
        scheduler=UniPCMultistepScheduler.from_config(tiny.SD_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- main -------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse(argv)
    import numpy as np
    import torch

    import diffusers
    from anonrisk.anonymize import ANONYMIZERS
    from anonrisk.anonymize.conditioning import Condition

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    size = args.size
    res = args.resolution or {"tiny": 64, "sd15": 512}[size]
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,4,8,16" if size == "tiny" else "1,8,16")).split(",")]
    cam_bs = args.camouflage_batch if args.camouflage_batch is not None else max(batch_sizes)
    images = make_images(max(batch_sizes + [cam_bs]), res)
    seeds = list(range(1000, 1000 + len(images)))

    t0 = time.perf_counter()
    params = anonymizer_params(args, size, res)
    anon = ANONYMIZERS.build("diffusion", **params)
    anon.setup(str(device))
    build_s = time.perf_counter() - t0
    dtype = anon.m.dtype
    print(f"[bench] {size} @ {res}px on {device} ({dtype}), built in {build_s:.1f}s", flush=True)

    peak = peak_matmul_flops(device, dtype if device.type == "cuda" else torch.float32)
    fl = count_flops(size, res, args.steps, not args.no_control_uncond)
    # the design-level figures at SD 1.5 size (what the GPU targets are about), whatever size runs here
    ref = fl if (size, res) == ("sd15", 512) else count_flops("sd15", 512, args.steps, not args.no_control_uncond)
    floor = peak / fl["per_image"]
    print(f"[bench] peak matmul {peak / 1e12:.2f} TFLOP/s; {fl['per_image'] / 1e12:.3f} TFLOP/image -> floor {floor:.2f} img/s", flush=True)

    warm = args.warmup + (1 if args.compile else 0)
    rows = []
    # the bare loop gets eager, untouched modules: its own on CUDA or when the anonymizer changed its modules
    fresh = device.type == "cuda" or args.compile or args.fuse_qkv or args.channels_last == "on"
    pipe = None if args.skip_bare else bare_pipeline(anon, fresh=fresh)
    for bs in batch_sizes:
        imgs, sd = images[:bs], seeds[:bs]
        ta = time_calls(lambda: anon(imgs, sd), warm, args.iters, device)
        row = {"batch": bs, "anonymizer_s": ta, "anonymizer_img_s": bs / statistics.median(ta)}
        if pipe is not None:
            cond = Condition("canny", "canny")
            maps = np.stack([anon._maps(cond, im) for im in imgs])
            control = torch.from_numpy(maps).permute(0, 3, 1, 2).float().div(255).to(device, dtype)
            pos = anon._embed([anon.p.prompt] * bs).to(dtype)
            neg = anon._embed([anon.p.negative_prompt] * bs).to(dtype)

            def bare():
                gens = [torch.Generator().manual_seed(s) for s in sd]
                lat = torch.stack([torch.randn((4, res // 8, res // 8), generator=g) for g in gens]).to(device, dtype)
                return pipe(prompt_embeds=pos, negative_prompt_embeds=neg, image=control, latents=lat, height=res, width=res,
                            num_inference_steps=args.steps, guidance_scale=7.5, output_type="np").images

            with torch.inference_mode():
                tb = time_calls(bare, args.warmup, args.iters, device)
            row.update(bare_s=tb, bare_img_s=bs / statistics.median(tb))
        row["anonymizer_over_bare"] = row["anonymizer_img_s"] / row["bare_img_s"] if "bare_img_s" in row else None
        row["anonymizer_over_floor"] = row["anonymizer_img_s"] / floor
        rows.append(row)
        print(f"[bench] batch {bs}: anonymizer {row['anonymizer_img_s']:.3f} img/s"
              + (f", bare {row['bare_img_s']:.3f} img/s" if "bare_img_s" in row else ""), flush=True)
    flagged = len(anon.flagged)
    del pipe

    camo = None
    if cam_bs:
        cparams = dict(params, conditions=[
            {"name": "depth", "scale": 0.6, "annotator": "midas"}, {"name": "normal", "scale": 0.4, "annotator": "normalbae"},
            {"name": "segmentation", "scale": 0.4, "annotator": "superpixel"}, {"name": "pose", "scale": 0.8, "annotator": "openpose"},
            {"name": "lineart", "scale": 0.5, "end": 0.5, "annotator": "lineart"}],
            annotator_weights={"midas": "random", "normalbae": "random", "openpose": "random", "lineart": "random"},
            identity_controlnet=f"random:{size}", anonymization_scale=2.0)
        del anon
        if device.type == "cuda":
            torch.cuda.empty_cache()
        cam = ANONYMIZERS.build("camouflage", **cparams)
        cam.setup(str(device))
        imgs, sd = images[:cam_bs], seeds[:cam_bs]
        tc = time_calls(lambda: cam(imgs, sd), warm, args.iters, device)
        one = next((r["anonymizer_img_s"] for r in rows if r["batch"] == cam_bs), None)
        camo = {"batch": cam_bs, "seconds": tc, "img_s": cam_bs / statistics.median(tc),
                "time_over_one_controlnet": (one / (cam_bs / statistics.median(tc))) if one else None,
                "flops_over_one_controlnet": fl["camouflage_over_one_controlnet"]}
        print(f"[bench] camouflage (5 ControlNets + identity branch) batch {cam_bs}: {camo['img_s']:.3f} img/s"
              + (f", {camo['time_over_one_controlnet']:.2f}x the time of one ControlNet" if one else ""), flush=True)

    result = {
        "label": f"{device.type}-{size}-{res}px",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()},
        "config": {"size": size, "resolution": res, "steps": args.steps, "cfg": 7.5, "scheduler": "unipc", "dtype": str(dtype).replace("torch.", ""),
                   "attention": args.attention, "channels_last": args.channels_last, "compile": args.compile, "fuse_qkv": args.fuse_qkv,
                   "control_uncond": not args.no_control_uncond, "iters": args.iters, "warmup": warm},
        "build_seconds": build_s,
        "peak_matmul_tflops": peak / 1e12,
        "flops": fl,
        "flops_sd15_512": ref,
        "floor_img_s": floor,
        "rows": rows,
        "camouflage": camo,
        "guard_flagged": flagged,
    }
    write(result, Path(args.out))
    return result


def write(result: dict, out: Path) -> None:
    from anonrisk.stages import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "anonymize_throughput.json"
    doc = json.loads(jpath.read_text()) if jpath.exists() else {"runs": {}}
    doc["runs"][result["label"]] = result
    with atomic_path(jpath) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    lines = ["# Anonymizer throughput", "",
             "Written by `benchmarks/anonymize_throughput.py` (random weights; text-to-image, one ControlNet, CFG 7.5, "
             "UniPC). `floor` = measured dense matmul throughput / counted FLOPs per image.", ""]
    for label, r in sorted(doc["runs"].items()):
        c, fl = r["config"], r["flops"]
        lines += [f"## {label}: {r['device']}", "",
                  f"{r['when']}; torch {r['versions']['torch']}, diffusers {r['versions']['diffusers']}; {c['steps']} steps, "
                  f"{c['dtype']}, attention {c['attention']}, channels_last {c['channels_last']}, compile {c['compile']}, "
                  f"fused QKV {c['fuse_qkv']}, ControlNet on the uncond branch {c['control_uncond']}.", "",
                  f"FLOPs: {fl['step_cfg_pair'] / 1e12:.4f} TFLOP per CFG step (UNet + ControlNet), {fl['vae_decode'] / 1e12:.4f} per VAE "
                  f"decode, {fl['per_image'] / 1e12:.4f} per image; peak {r['peak_matmul_tflops']:.2f} TFLOP/s -> floor "
                  f"**{r['floor_img_s']:.2f} img/s**.", "",
                  "| batch | anonymizer img/s | bare diffusers img/s | anonymizer / bare | anonymizer / floor |",
                  "|---:|---:|---:|---:|---:|"]
        for row in r["rows"]:
            bare = f"{row['bare_img_s']:.3f}" if row.get("bare_img_s") else "-"
            ratio = f"{row['anonymizer_over_bare']:.2f}" if row.get("anonymizer_over_bare") else "-"
            lines.append(f"| {row['batch']} | {row['anonymizer_img_s']:.3f} | {bare} | {ratio} | {row['anonymizer_over_floor']:.3f} |")
        cam = r.get("camouflage")
        lines.append("")
        if cam:
            t = f"{cam['time_over_one_controlnet']:.2f}x" if cam.get("time_over_one_controlnet") else "-"
            lines.append(f"Five ControlNets + identity branch (camouflage), batch {cam['batch']}: {cam['img_s']:.3f} img/s, "
                         f"time per image {t} one ControlNet's; FLOPs per image {cam['flops_over_one_controlnet']:.2f}x.")
        else:
            lines.append(f"Five ControlNets + identity branch (camouflage): FLOPs per image {fl['camouflage_over_one_controlnet']:.2f}x one ControlNet's (not timed).")
        ref = r.get("flops_sd15_512")
        if ref:
            lines.append(f"At SD 1.5 size, 512 px (counted): {ref['step_cfg_pair'] / 1e12:.3f} TFLOP per CFG step, {ref['vae_decode'] / 1e12:.3f} "
                         f"per VAE decode, {ref['per_image'] / 1e12:.2f} per image; five ControlNets + identity branch "
                         f"{ref['camouflage_over_one_controlnet']:.2f}x one ControlNet per image.")
        if r.get("guard_flagged"):
            lines.append(f"Guard: {r['guard_flagged']} record(s) flagged NaN/black (random weights).")
        lines.append("")
    with atomic_path(out / "anonymize_throughput.md") as tmp:
        tmp.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
