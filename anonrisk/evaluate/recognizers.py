"""Off-the-shelf face recognizers behind one interface, and the ``recognizer`` attack that uses them.

``Recognizer.embed(images)`` maps uint8 (N,H,W,3) images to (N,D) descriptors; ``similarity`` compares two
sets. Built in, all offline:

- ``dlib``: dlib's 128-d ResNet (``dlib_face_recognition_resnet_model_v1.dat``) with its 5-point shape
  predictor, as shipped by the ``face-recognition-models`` package (found by path, no pkg_resources) or in
  ``params.models_dir``. Faces are found with dlib's HOG detector; an aligned crop where none is found is
  taken whole. Similarity is minus the Euclidean distance (dlib's own metric; 0.6 is its same-person line).
- ``arcface``: an insightface ``iresnet`` (18/34/50/100) from a local weights file, 112 px, cosine.
- ``facenet``: FaceNet ``InceptionResnetV1`` from a local weights file, 160 px, cosine.

A recognizer whose package or weights are missing raises ``Unavailable``: the report skips its column and
says why. Weights load with safetensors or ``torch.load(weights_only=True)``; nothing is downloaded.
"""

from __future__ import annotations

import abc
import importlib.util
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from anonrisk.attack.suite import ATTACKS, Attack
from anonrisk.errors import ConfigError, Unavailable
from anonrisk.registry import Registry
from anonrisk.stages import StageDir, fingerprint

RECOGNIZERS: Registry[type["Recognizer"]] = Registry("recognizer")


class Recognizer(abc.ABC):
    version: ClassVar[int] = 1
    #: "cosine" (unit descriptors) or "euclidean" (similarity = -distance)
    metric: ClassVar[str] = "cosine"

    def __init__(self, key: str = "recognizer", **params: Any):
        self.key = key
        self.params = params

    def check(self) -> None:
        """Raise Unavailable (missing package or weights) or ConfigError (a wrong setting) before any image."""

    @abc.abstractmethod
    def embed(self, images: np.ndarray) -> np.ndarray:
        """(N,H,W,3) uint8 -> (N,D) float32 descriptors."""

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if self.metric == "cosine":
            return a @ b.T
        # float64: in float32 |a|^2 + |b|^2 - 2ab cancels to ~1e-6 for equal rows, and the square root
        # makes that a distance of ~1e-3 whose sign and size depend on the CPU's BLAS kernels
        a, b = a.astype(np.float64), b.astype(np.float64)
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
        return -np.sqrt(np.maximum(d2, 0))

    def describe(self) -> dict[str, Any]:
        """What decides the descriptors (fingerprints); device and batch size do not."""
        params = {k: v for k, v in self.params.items() if k not in ("device", "batch_size")}
        return {"class": type(self).__name__, "version": self.version, "params": params}


def face_recognition_models_dir() -> Path | None:
    """The ``models/`` folder of the face-recognition-models package, found without importing it (its
    ``__init__`` needs pkg_resources, which current setuptools no longer ships)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent / "models"


@RECOGNIZERS.register("dlib")
class DlibRecognizer(Recognizer):
    metric = "euclidean"
    FILES = ("dlib_face_recognition_resnet_model_v1.dat", "shape_predictor_5_face_landmarks.dat")

    def __init__(self, key="recognizer", models_dir: str | None = None, detect: bool = True, upsample: int = 1,
                 min_size: int = 150, jitters: int = 0):
        super().__init__(key, models_dir=models_dir, detect=detect, upsample=upsample, min_size=min_size, jitters=jitters)
        self._nets = None

    def models_dir(self) -> Path:
        if self.params["models_dir"]:
            return Path(self.params["models_dir"]).expanduser()
        found = face_recognition_models_dir()
        if found is None:
            raise Unavailable("dlib recognizer: package face-recognition-models is not installed "
                              "(pip install 'anonrisk[recognizers]') and no params.models_dir was given")
        return found

    def check(self):
        if importlib.util.find_spec("dlib") is None:
            raise Unavailable("dlib recognizer: package dlib is not installed (pip install 'anonrisk[recognizers]', which brings dlib-bin)")
        d = self.models_dir()
        missing = [f for f in self.FILES if not (d / f).exists()]
        if missing:
            raise Unavailable(f"dlib recognizer: weights not found in {d}: {', '.join(missing)}")

    def _load(self):
        if self._nets is None:
            self.check()
            import dlib

            d = self.models_dir()
            self._nets = (dlib.get_frontal_face_detector(), dlib.shape_predictor(str(d / self.FILES[1])),
                          dlib.face_recognition_model_v1(str(d / self.FILES[0])))
        return self._nets

    def embed(self, images):
        import dlib
        from PIL import Image

        detector, shape, net = self._load()
        p = self.params
        out = np.empty((len(images), 128), np.float32)
        for i, im in enumerate(images):
            if min(im.shape[:2]) < p["min_size"]:  # small crops: upscale so the detector and landmarks work
                side = p["min_size"]
                im = np.asarray(Image.fromarray(im).resize((side, side), Image.BICUBIC))
            im = np.ascontiguousarray(im)
            faces = detector(im, p["upsample"]) if p["detect"] else []
            if len(faces):
                rect = max(faces, key=lambda r: r.area())
            else:  # an aligned crop: the whole image is the face
                rect = dlib.rectangle(0, 0, im.shape[1] - 1, im.shape[0] - 1)
            out[i] = np.asarray(net.compute_face_descriptor(im, shape(im, rect), p["jitters"]), np.float32)
        return out


def load_weights(path: str | None, key: str, what: str) -> dict:
    """A state dict from a local ``.safetensors`` or ``torch.load(weights_only=True)`` file."""
    from anonrisk.weights import read_state_dict

    if not path:
        raise Unavailable(f"{what}: {key}.params.weights is not set; its weights are never downloaded, give a local "
                          ".safetensors or .pt/.pth state dict")
    p = Path(path).expanduser()
    if not p.exists():
        raise Unavailable(f"{what}: weights file not found: {p} ({key}.params.weights)")
    return read_state_dict(p)


class TorchRecognizer(Recognizer):
    """A torch embedding network with fixed input size and normalisation, weights from ``params.weights``."""

    size: ClassVar[int] = 112

    def __init__(self, key="recognizer", weights: str | None = None, device: str = "cpu", batch_size: int = 64, **extra):
        super().__init__(key, weights=weights, device=device, batch_size=batch_size, **extra)
        self._net = None

    @abc.abstractmethod
    def build(self): ...

    @abc.abstractmethod
    def normalize(self, x): ...

    def check(self):
        self._load()

    def _load(self):
        if self._net is None:
            state = load_weights(self.params["weights"], self.key, type(self).__name__)
            net = self.build()
            state = {k.removeprefix("module."): v for k, v in state.items()}
            missing, unexpected = net.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise Unavailable(f"{self.key}.params.weights: {self.params['weights']} does not fit {type(self).__name__} "
                                  f"({len(missing)} keys missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})")
            self._net = net.to(self.params["device"]).eval()
        return self._net

    def embed(self, images):
        import torch
        import torch.nn.functional as F

        net = self._load()
        out = []
        with torch.no_grad():
            for i in range(0, len(images), self.params["batch_size"]):
                x = torch.from_numpy(images[i : i + self.params["batch_size"]]).permute(0, 3, 1, 2).float()
                if x.shape[-1] != self.size or x.shape[-2] != self.size:
                    x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
                e = net(self.normalize(x).to(self.params["device"])).float().cpu()
                out.append(F.normalize(e, dim=1))
        return torch.cat(out).numpy() if out else np.zeros((0, 512), np.float32)


@RECOGNIZERS.register("arcface")
class ArcFaceRecognizer(TorchRecognizer):
    size = 112

    def __init__(self, key="recognizer", weights=None, device="cpu", batch_size=64, arch: str = "iresnet50"):
        from anonrisk.evaluate.face_nets import IRESNET_LAYERS

        if arch not in IRESNET_LAYERS:
            raise ConfigError(f"{key}.params.arch: {arch!r} is not allowed; expected one of {', '.join(IRESNET_LAYERS)}")
        super().__init__(key, weights, device, batch_size, arch=arch)

    def build(self):
        from anonrisk.evaluate.face_nets import IRESNET_LAYERS, IResNet

        return IResNet(IRESNET_LAYERS[self.params["arch"]])

    def normalize(self, x):
        return x / 127.5 - 1.0


@RECOGNIZERS.register("facenet")
class FaceNetRecognizer(TorchRecognizer):
    size = 160

    def build(self):
        from anonrisk.evaluate.face_nets import InceptionResnetV1

        return InceptionResnetV1()

    def normalize(self, x):
        return (x - 127.5) / 128.0


def build_recognizer(params: dict, key: str = "recognizer") -> Recognizer:
    """A recognizer from attack params: ``model`` (dlib, arcface, facenet) picks it, the rest are its settings."""
    params = dict(params)
    model = params.pop("model", "dlib")
    cls = RECOGNIZERS.get(model, f"{key}.params.model")
    try:
        return cls(key, **params)
    except TypeError as exc:
        raise ConfigError(f"{key}.params: bad parameters for recognizer {model!r}: {exc}") from None


@ATTACKS.register("recognizer")
class RecognizerAttack(Attack):
    threat = "an off-the-shelf face recognizer, no access to the anonymizer, no training"

    def recognizer(self) -> Recognizer:
        if not hasattr(self, "_rec"):
            self._rec = build_recognizer(self.spec.params, self.key)
        return self._rec

    def validate(self, pipe):
        self.recognizer().check()

    def fingerprint(self, pipe, target):
        _, anon_stage = pipe.anonymizer_stage(target)
        desc = self.recognizer().describe()
        return fingerprint("attack", type(self).__name__, self.version, desc, pipe.data_fp, anon_stage.fingerprint)

    def gallery_embeddings(self, pipe, gallery: Sequence) -> np.ndarray:
        """Originals are embedded once per recognizer and dataset and reused for every anonymizer."""
        from anonrisk.data.io import load_batch
        from anonrisk.stages import write_json

        rec = self.recognizer()
        desc = rec.describe()
        stage = StageDir(pipe.cfg.runs_dir, "embed", fingerprint("embed", desc, pipe.data_fp, pipe.cfg.data.image_size, [r.id for r in gallery]))
        if stage.is_done():
            return np.load(stage / "gallery.npy")
        stage.begin({"recognizer": desc, "records": len(gallery)})
        emb = rec.embed(load_batch([r.path for r in gallery], pipe.cfg.data.image_size))
        np.save(stage / "gallery.npy", emb)
        write_json(stage / "ids.json", [r.id for r in gallery])
        stage.mark_done({"records": len(gallery)})
        return emb

    def similarity(self, pipe, target, probes, gallery):
        import torch

        from anonrisk.data.io import load_batch

        rec = self.recognizer()
        rec.check()
        p = rec.embed(load_batch([r.path for r in probes], pipe.cfg.data.image_size))
        return torch.from_numpy(rec.similarity(p, self.gallery_embeddings(pipe, gallery))).float()
