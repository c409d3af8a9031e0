"""Condition maps for ControlNets: condition name -> annotator -> map, cached by content hash.

A *condition* is what a ControlNet was trained on (``canny``, ``softedge``, ``depth``, ``lineart``,
``normal``, ``segmentation``, ``pose``); an *annotator* computes it from an image. Annotators come from
controlnet-aux (and transformers for UperNet segmentation), built from their classes and loaded from local
weight files only (safetensors or ``torch.load(weights_only=True)``); ``"random"`` builds the network with
random weights, seeded (tests, throughput). Weight-free annotators: ``canny``, ``lineart_standard``,
``superpixel``.

Every annotator takes and returns uint8 ``(H, W, 3)`` RGB at the working resolution. Maps are cached by a
hash of the image bytes and everything that decides the map (annotator, options, weights, size): in memory
(bounded in bytes) and optionally on disk as PNG files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from anonrisk.errors import ConfigError

log = logging.getLogger("anonrisk.conditioning")

Map = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class AnnotatorInfo:
    name: str
    conditions: tuple[str, ...]
    #: what to put in ``annotator_weights.<name>`` (None: needs no weights)
    weights_hint: Optional[str]
    builder: Callable[[Optional[str], int, dict, str], Map] = field(repr=False)


ANNOTATORS: dict[str, AnnotatorInfo] = {}

#: condition -> the annotator used when a condition names none
DEFAULT_ANNOTATOR = {
    "canny": "canny",
    "softedge": "hed",
    "depth": "midas",
    "lineart": "lineart",
    "normal": "normalbae",
    "segmentation": "upernet",
    "pose": "openpose",
}
CONDITIONS = tuple(DEFAULT_ANNOTATOR)


def _annotator(name: str, conditions: tuple[str, ...], weights_hint: Optional[str] = None):
    def deco(builder):
        ANNOTATORS[name] = AnnotatorInfo(name, conditions, weights_hint, builder)
        return builder

    return deco


# ----------------------------------------------------------------------------------------------------------
# helpers


def _hwc3(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


def _resize(a: np.ndarray, h: int, w: int) -> np.ndarray:
    import cv2

    if a.shape[:2] == (h, w):
        return a
    interp = cv2.INTER_AREA if a.shape[0] > h else cv2.INTER_LINEAR
    return _hwc3(cv2.resize(a, (w, h), interpolation=interp))


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
    return _resize(_hwc3(np.asarray(out, dtype=np.uint8)), h, w)


def load_state_dict(path: str) -> dict:
    """A state dict from a local ``.safetensors`` file or a pickle-free ``torch.load(weights_only=True)``."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # checkpoints that wrap the weights
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}


def _seeded_build(seed: int, factory):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def _net(weights: Optional[str], seed: int, factory, device: str = "cpu"):
    """Build a network from its class; random (seeded) for ``"random"``, else weights from a local file."""
    net = _seeded_build(seed, factory)
    if weights != "random":
        net.load_state_dict(load_state_dict(weights))
    return net.float().eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------------------------------------
# annotators (built lazily; controlnet-aux is imported only here)


@_annotator("canny", ("canny",))
def _canny(weights, seed, opts, device) -> Map:
    import cv2

    lo, hi = int(opts.get("low_threshold", 100)), int(opts.get("high_threshold", 200))
    return lambda img: _hwc3(cv2.Canny(img, lo, hi))


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
        return _hwc3((d * 255.0).round().astype(np.uint8))

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
        net.load_state_dict(transfer(net, load_state_dict(weights)))
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


# ----------------------------------------------------------------------------------------------------------
# condition specs, validation, building


@dataclass(frozen=True)
class Condition:
    """One ControlNet input: ``name`` (what the ControlNet expects), the annotator that makes it, its
    conditioning ``scale`` and the fraction of the denoising steps it is active in (``start``..``end``)."""

    name: str
    annotator: str
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    options: tuple = ()

    @property
    def opts(self) -> dict:
        return dict(self.options)


def parse_condition(entry: Any, index: int) -> Condition:
    key = f"conditions[{index}]"
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or "name" not in entry:
        raise ConfigError(f"{key}: expected a condition name or a mapping with 'name', got {entry!r}")
    allowed = {"name", "annotator", "scale", "start", "end", "options"}
    extra = sorted(set(entry) - allowed)
    if extra:
        raise ConfigError(f"{key}: unknown key(s) {', '.join(extra)}; valid keys: {', '.join(sorted(allowed))}")
    name = entry["name"]
    if name not in DEFAULT_ANNOTATOR:
        raise ConfigError(f"{key}: unknown condition {name!r}; known: {', '.join(CONDITIONS)}")
    annotator = entry.get("annotator") or DEFAULT_ANNOTATOR[name]
    try:
        scale, start, end = float(entry.get("scale", 1.0)), float(entry.get("start", 0.0)), float(entry.get("end", 1.0))
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: scale, start and end must be numbers") from None
    if not 0.0 <= start < end <= 1.0:
        raise ConfigError(f"{key}: need 0 <= start < end <= 1 (fractions of the denoising steps), got {start}..{end}")
    options = entry.get("options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"{key}.options: expected a mapping of annotator options")
    return Condition(name, annotator, scale, start, end, tuple(sorted(options.items())))


def check_annotator(cond: Condition, index: int, weights: dict[str, str]) -> None:
    """ConfigError unless ``cond`` has an annotator that can run with the configured weights."""
    key = f"conditions[{index}] ({cond.name})"
    info = ANNOTATORS.get(cond.annotator)
    if info is None:
        raise ConfigError(f"{key}: unknown annotator {cond.annotator!r}; known: {', '.join(sorted(ANNOTATORS))}")
    if cond.name not in info.conditions:
        fits = [a for a, i in sorted(ANNOTATORS.items()) if cond.name in i.conditions]
        raise ConfigError(f"{key}: annotator {cond.annotator!r} does not make {cond.name!r} maps; use one of: {', '.join(fits)}")
    if info.weights_hint is None:
        return
    w = weights.get(cond.annotator)
    if not w:
        free = [a for a, i in sorted(ANNOTATORS.items()) if cond.name in i.conditions and i.weights_hint is None]
        alt = f", or pick a weight-free annotator ({', '.join(free)})" if free else ""
        raise ConfigError(
            f"{key}: annotator {cond.annotator!r} needs a network but none is configured; set "
            f"params.annotator_weights.{cond.annotator} to a local path: {info.weights_hint} "
            f"(or 'random' for random weights in tests){alt}"
        )
    if w != "random" and not os.path.exists(w):
        raise ConfigError(f"params.annotator_weights.{cond.annotator}: {w!r} does not exist ({info.weights_hint})")


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
            _BUILT[key] = ANNOTATORS[name].builder(weights, seed, dict(options), device)
        return _BUILT[key]


class _MapStore:
    """The in-memory map cache of a process, shared by every anonymizer (keys hash the image and everything
    that decides its map), least recently used out first, bounded in bytes."""

    def __init__(self):
        self.maps: OrderedDict[str, np.ndarray] = OrderedDict()
        self.nbytes = 0
        self.max_bytes = 0
        self.lock = threading.Lock()

    def get(self, k: str) -> Optional[np.ndarray]:
        with self.lock:
            a = self.maps.get(k)
            if a is not None:
                self.maps.move_to_end(k)
            return a

    def put(self, k: str, a: np.ndarray, max_bytes: int) -> None:
        with self.lock:
            self.max_bytes = max(self.max_bytes, max_bytes)
            if k in self.maps or a.nbytes > self.max_bytes:
                return
            self.maps[k] = a
            self.nbytes += a.nbytes
            while self.nbytes > self.max_bytes:
                _, old = self.maps.popitem(last=False)
                self.nbytes -= old.nbytes

    def clear(self) -> None:
        with self.lock:
            self.maps.clear()
            self.nbytes = 0


STORE = _MapStore()


class ConditionMaps:
    """Computes condition maps through annotators, with a content-hash cache: in memory (``STORE``, shared
    by the process; ``max_bytes=0`` turns it off) and optionally on disk (``cache_dir``, PNG files)."""

    def __init__(self, weights: dict[str, str], seed: int = 0, cache_dir: Optional[str] = None,
                 max_bytes: int = 256 << 20, device: str = "cpu"):
        self.weights = dict(weights)
        self.seed = seed
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.max_bytes = max_bytes
        self.device = device
        self.hits = 0
        self.misses = 0

    def key(self, cond: Condition, image: np.ndarray) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(image).tobytes())
        h.update(repr((image.shape, cond.name, cond.annotator, cond.options, self.seed,
                       weights_identity(self.weights.get(cond.annotator)))).encode())
        return h.hexdigest()[:32]

    def __call__(self, cond: Condition, image: np.ndarray) -> np.ndarray:
        k = self.key(cond, image)
        out = STORE.get(k) if self.max_bytes else None
        if out is None:
            out = self._disk_get(k)
            if out is None:
                self.misses += 1
                fn = get_annotator(cond.annotator, self.weights.get(cond.annotator), self.seed, cond.opts, self.device)
                out = _hwc3(np.asarray(fn(image), dtype=np.uint8))
                if out.shape != image.shape:
                    out = _resize(out, *image.shape[:2])
                self._disk_put(k, out)
            else:
                self.hits += 1
            out.setflags(write=False)  # shared through the cache
            if self.max_bytes:
                STORE.put(k, out, self.max_bytes)
        else:
            self.hits += 1
        return out

    def _disk_get(self, k: str) -> Optional[np.ndarray]:
        if self.cache_dir is None:
            return None
        p = self.cache_dir / k[:2] / f"{k}.png"
        if not p.exists():
            return None
        from PIL import Image

        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()

    def _disk_put(self, k: str, a: np.ndarray) -> None:
        if self.cache_dir is None:
            return
        from PIL import Image

        from anonrisk.stages import atomic_path

        with atomic_path(self.cache_dir / k[:2] / f"{k}.png") as tmp:
            Image.fromarray(a).save(tmp, format="PNG")
