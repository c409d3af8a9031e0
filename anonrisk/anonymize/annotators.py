"""Annotators: what computes a ControlNet's condition map from an image, on the shared ``Registry``.

Annotators come from controlnet-aux (and transformers for UperNet segmentation), built from their classes
and loaded from local weight files only (safetensors or ``torch.load(weights_only=True)``); ``"random"``
builds the network with random weights, seeded (tests, throughput). Weight-free annotators: ``canny``,
``lineart_standard``, ``superpixel``. Every annotator takes and returns uint8 ``(H, W, 3)`` RGB at the
working resolution; controlnet-aux is imported only inside the builders.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from anonrisk.errors import ConfigError
from anonrisk.registry import Registry
from anonrisk.weights import read_state_dict

log = logging.getLogger("anonrisk.conditioning")

Map = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Annotator:
    name: str
    conditions: tuple[str, ...]  # the condition maps it makes
    #: what to put in ``annotator_weights.<name>`` (None: needs no weights)
    weights_hint: Optional[str]
    builder: Callable[[Optional[str], int, dict, str], Map] = field(repr=False)


ANNOTATORS: Registry[Annotator] = Registry("annotator")


def _annotator(name: str, conditions: tuple[str, ...], weights_hint: Optional[str] = None):
    def deco(builder):
        ANNOTATORS.add(name, Annotator(name, conditions, weights_hint, builder))
        return builder

    return deco


def making(condition: str, weight_free: bool = False) -> list[str]:
    """The annotators that make ``condition`` maps (only those that need no weights)."""
    return [n for n in ANNOTATORS.names() if condition in ANNOTATORS.get(n).conditions
            and (not weight_free or ANNOTATORS.get(n).weights_hint is None)]


# ----------------------------------------------------------------------------------------------------------
# helpers


def hwc3(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


def resize_map(a: np.ndarray, h: int, w: int) -> np.ndarray:
    import cv2

    if a.shape[:2] == (h, w):
        return a
    interp = cv2.INTER_AREA if a.shape[0] > h else cv2.INTER_LINEAR
    return hwc3(cv2.resize(a, (w, h), interpolation=interp))


def _detect_res(image: np.ndarray) -> int:
    """controlnet-aux rounds sizes to multiples of 64: run it at >= 64 px and resize its map back."""
    side = min(image.shape[:2])
    return max(64, int(np.ceil(side / 64.0)) * 64)


def _aux_call(detector, image: np.ndarray, **kwargs) -> np.ndarray:
    import inspect

    h, w = image.shape[:2]
    res = _detect_res(image)
    if "image_resolution" in inspect.signature(detector.__call__).parameters:
        kwargs["image_resolution"] = res
    out = detector(image, detect_resolution=res, output_type="np", **kwargs)
    return resize_map(hwc3(np.asarray(out, dtype=np.uint8)), h, w)



def _seeded_build(seed: int, factory):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def _net(weights: Optional[str], seed: int, factory, device: str = "cpu"):
    """Build a network from its class; random (seeded) for ``"random"``, else weights from a local file."""
    net = _seeded_build(seed, factory)
    if weights != "random":
        net.load_state_dict(read_state_dict(weights))
    return net.float().eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------------------------------------
# annotators (built lazily; controlnet-aux is imported only here)


@_annotator("canny", ("canny",))
def _canny(weights, seed, opts, device) -> Map:
    import cv2

    lo, hi = int(opts.get("low_threshold", 100)), int(opts.get("high_threshold", 200))
    return lambda img: hwc3(cv2.Canny(img, lo, hi))


@_annotator("lineart_standard", ("lineart",))
def _lineart_standard(weights, seed, opts, device) -> Map:
    from controlnet_aux import LineartStandardDetector

    det = LineartStandardDetector()
    return lambda img: _aux_call(det, img, **opts)


@_annotator("superpixel", ("segmentation",))
def _superpixel(weights, seed, opts, device) -> Map:
    """Weight-free segmentation: Felzenszwalb regions painted with a fixed palette (not ADE20K classes)."""
    from skimage.segmentation import felzenszwalb

    scale, min_size = float(opts.get("scale", 100.0)), int(opts.get("min_size", 20))
    palette = np.random.default_rng(seed).integers(0, 256, size=(4096, 3), dtype=np.uint8)

    def run(img):
        labels = felzenszwalb(img, scale=scale, sigma=0.8, min_size=min_size)
        return palette[labels % len(palette)]

    return run


@_annotator("hed", ("softedge",), "ControlNetHED.pth (lllyasviel/Annotators)")
def _hed(weights, seed, opts, device) -> Map:
    from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector

    det = HEDdetector(_net(weights, seed, ControlNetHED_Apache2, device))
    return lambda img: _aux_call(det, img, **opts)


@_annotator("pidinet", ("softedge",), "table5_pidinet.pth (lllyasviel/Annotators)")
def _pidinet(weights, seed, opts, device) -> Map:
    from controlnet_aux.pidi import PidiNetDetector
    from controlnet_aux.pidi.model import pidinet

    det = PidiNetDetector(_net(weights, seed, pidinet, device))
    return lambda img: _aux_call(det, img, **opts)


@_annotator("lineart", ("lineart",), "sk_model.pth and sk_model2.pth (lllyasviel/Annotators): give the folder")
def _lineart(weights, seed, opts, device) -> Map:
    from controlnet_aux.lineart import Generator, LineartDetector

    if weights == "random":
        fine_w = coarse_w = "random"
    else:
        fine_w, coarse_w = os.path.join(weights, "sk_model.pth"), os.path.join(weights, "sk_model2.pth")
    fine = _net(fine_w, seed, lambda: Generator(3, 1, 3), device)
    coarse = _net(coarse_w, seed + 1, lambda: Generator(3, 1, 3), device)
    det = LineartDetector(fine, coarse)
    return lambda img: _aux_call(det, img, **opts)


@_annotator("midas", ("depth",), "dpt_hybrid-midas-501f0c75.pt (lllyasviel/Annotators)")
def _midas(weights, seed, opts, device) -> Map:
    import torch
    from controlnet_aux.midas import MidasDetector
    from controlnet_aux.midas.api import MiDaSInference
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    opts = dict(opts)
    backbone = {"dpt_hybrid": "vitb_rn50_384", "dpt_large": "vitl16_384"}[opts.pop("model_type", "dpt_hybrid")]
    dpt = _net(weights, seed, lambda: DPTDepthModel(path=None, backbone=backbone, non_negative=True), device)
    inference = MiDaSInference.__new__(MiDaSInference)  # its __init__ insists on downloading; wrap ours
    torch.nn.Module.__init__(inference)
    inference.model = dpt
    det = MidasDetector(inference)
    return lambda img: _aux_call(det, img, **opts)


@_annotator("depth_anything", ("depth",), "a local transformers Depth Anything folder (e.g. LiheYoung/depth-anything-large-hf)")
def _depth_anything(weights, seed, opts, device) -> Map:
    """Relative depth from transformers' Depth Anything (the depth maps of the instance-augmentation recipe),
    scaled to 0..255 per image (near = bright, as ControlNet depth expects)."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    if weights == "random":
        raise ConfigError("annotator depth_anything: random weights are not supported; use annotator midas for tests")
    processor = AutoImageProcessor.from_pretrained(weights, local_files_only=True)
    model = AutoModelForDepthEstimation.from_pretrained(weights, local_files_only=True).eval().to(device)

    def run(img):
        inputs = processor(images=img, return_tensors="pt")
        with torch.no_grad():
            depth = model(**{k: v.to(model.device) for k, v in inputs.items()}).predicted_depth
            depth = torch.nn.functional.interpolate(depth[:, None], size=img.shape[:2], mode="bicubic", align_corners=False)[0, 0]
        d = depth.float().cpu().numpy()
        d = (d - d.min()) / max(float(d.max() - d.min()), 1e-6)
        return hwc3((d * 255.0).round().astype(np.uint8))

    return run


@_annotator("normalbae", ("normal",), "scannet.pt (lllyasviel/Annotators)")
def _normalbae(weights, seed, opts, device) -> Map:
    import types

    from controlnet_aux.normalbae import NormalBaeDetector
    from controlnet_aux.normalbae.nets.NNET import NNET

    args = types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4, importance_ratio=0.7)
    det = NormalBaeDetector(_net(weights, seed, lambda: NNET(args), device))
    return lambda img: _aux_call(det, img, **opts)


@_annotator("openpose", ("pose",), "body_pose_model.pth (lllyasviel/Annotators)")
def _openpose(weights, seed, opts, device) -> Map:
    from controlnet_aux.open_pose import OpenposeDetector
    from controlnet_aux.open_pose.body import Body
    from controlnet_aux.open_pose.model import bodypose_model
    from controlnet_aux.open_pose.util import transfer

    net = _seeded_build(seed, bodypose_model)
    if weights != "random":
        net.load_state_dict(transfer(net, read_state_dict(weights)))
    body = Body.__new__(Body)  # Body.__init__ loads a file with a bare torch.load: set the model ourselves
    body.model = net.float().eval().requires_grad_(False).to(device)
    det = OpenposeDetector(body)
    opts = {"include_hand": False, "include_face": False, **opts}
    return lambda img: _aux_call(det, img, **opts)


@_annotator("upernet", ("segmentation",), "a local transformers UperNet folder (e.g. openmmlab/upernet-convnext-small)")
def _upernet(weights, seed, opts, device) -> Map:
    """ADE20K semantic segmentation painted with a palette: ``palette`` (a JSON/NPY file of 150 RGB rows,
    the one the segmentation ControlNet was trained with) or, if absent, a fixed pseudo-random palette."""
    import torch
    from transformers import AutoImageProcessor, UperNetForSemanticSegmentation

    if weights == "random":
        raise ConfigError("annotator upernet: random weights are not supported; use annotator superpixel for tests")
    processor = AutoImageProcessor.from_pretrained(weights, local_files_only=True)
    model = UperNetForSemanticSegmentation.from_pretrained(weights, local_files_only=True).eval().to(device)
    palette = _load_palette(opts.get("palette"), model.config.num_labels, seed)

    def run(img):
        inputs = processor(images=img, return_tensors="pt")
        with torch.no_grad():
            logits = model(**{k: v.to(model.device) for k, v in inputs.items()}).logits
            logits = torch.nn.functional.interpolate(logits, size=img.shape[:2], mode="bilinear", align_corners=False)
        return palette[logits[0].argmax(0).cpu().numpy() % len(palette)]

    return run


def _load_palette(path: Optional[str], n: int, seed: int) -> np.ndarray:
    if path is None:
        log.warning("upernet: no palette file given; painting classes with a pseudo-random palette "
                    "(a segmentation ControlNet expects the ADE20K palette it was trained with)")
        return np.random.default_rng(seed).integers(0, 256, size=(max(n, 1), 3), dtype=np.uint8)
    if path.endswith(".npy"):
        arr = np.load(path, allow_pickle=False)
    else:
        import json

        arr = np.asarray(json.loads(Path(path).read_text()))
    return arr.astype(np.uint8).reshape(-1, 3)



def weights_identity(weights: Optional[str]) -> str:
    """What identifies a weights path in cache keys: its size and mtime (cheap) or ``random``."""
    if not weights or weights == "random":
        return str(weights)
    p = Path(weights)
    files = sorted(p.rglob("*")) if p.is_dir() else [p]
    return ";".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file())


_BUILT: dict[tuple, Map] = {}
_BUILD_LOCK = threading.Lock()


def get_annotator(name: str, weights: Optional[str], seed: int, options: dict, device: str = "cpu") -> Map:
    """Build (once per process) and return an annotator function uint8 (H,W,3) -> uint8 (H,W,3)."""
    key = (name, weights_identity(weights), seed, tuple(sorted(options.items())), device)
    with _BUILD_LOCK:
        if key not in _BUILT:
            _BUILT[key] = ANNOTATORS.get(name).builder(weights, seed, dict(options), device)
        return _BUILT[key]
