"""The ``recognizer`` attack: an off-the-shelf face recognizer (``evaluate/recognizers.py``: dlib, ArcFace,
FaceNet from local weights), no access to the anonymizer, no training. ``params.model`` picks the recognizer;
the other params are its settings, checked by its Params model. A recognizer whose package or weights are
missing raises ``Unavailable``: the report skips its column and says why."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from pydantic import ConfigDict, Field

from anonrisk.attack.base import ATTACKS, Attack
from anonrisk.config.validation import Strict, validate_model
from anonrisk.evaluate.recognizers import RECOGNIZERS, build_recognizer


class RecognizerParams(Strict):
    model_config = ConfigDict(extra="allow")  # the recognizer's own settings, checked by its model below
    model: str = "dlib"


class DlibParams(Strict):
    models_dir: Optional[str] = None  # default: the face-recognition-models package's folder
    detect: bool = True  # find the face with dlib's HOG detector (else the whole crop is the face)
    upsample: int = Field(1, ge=0)
    min_size: int = Field(150, ge=1)  # smaller crops are upscaled to this side first
    jitters: int = Field(0, ge=0)


class TorchRecognizerParams(Strict):
    weights: Optional[str] = None  # a local .safetensors or .pt state dict; never downloaded
    device: str = "cpu"
    batch_size: int = Field(64, ge=1)


class ArcFaceParams(TorchRecognizerParams):
    arch: str = "iresnet50"


#: recognizer -> its settings (a recognizer registered without one gets its keyword arguments unchecked)
MODEL_PARAMS = {"dlib": DlibParams, "arcface": ArcFaceParams, "facenet": TorchRecognizerParams}


@ATTACKS.register("recognizer")
class RecognizerAttack(Attack):
    Params = RecognizerParams
    threat = "an off-the-shelf face recognizer, no access to the anonymizer, no training"

    def __init__(self, params: RecognizerParams, key: str = ""):
        super().__init__(params, key)
        model = params.model
        RECOGNIZERS.get(model, f"{key}.params.model")
        settings = dict(params.model_extra or {})
        if model in MODEL_PARAMS:
            settings = validate_model(MODEL_PARAMS[model], settings, f"{key}: recognizer {model!r}", prefix="params.").model_dump()
        self.recognizer = build_recognizer({"model": model, **settings}, key)

    def settings(self):
        return self.recognizer.describe()

    def caches(self):
        # the originals' descriptors: once per recognizer and dataset, shared by every anonymizer
        return {"embed": self.recognizer.describe()}

    def validate(self, ctx):
        self.recognizer.check()

    def gallery_embeddings(self, ctx, gallery: Sequence) -> np.ndarray:
        from anonrisk.data.io import load_batch
        from anonrisk.stages import atomic_path, write_json

        stage = ctx.caches["embed"]
        with stage.lock():
            if stage.reuse(["gallery.npy"]):
                return np.load(stage / "gallery.npy")
            stage.begin({"recognizer": self.recognizer.describe(), "records": len(gallery)})
            emb = self.recognizer.embed(load_batch([r.path for r in gallery], ctx.image_size))
            with atomic_path(stage / "gallery.npy") as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, emb)
            write_json(stage / "ids.json", [r.id for r in gallery])
            stage.mark_done({"records": len(gallery)}, outputs=["gallery.npy", "ids.json"])
            return emb

    def similarity(self, ctx, probes, gallery):
        from anonrisk.data.io import load_batch
        from anonrisk.evaluate.protocols import StreamedSimilarity

        rec = self.recognizer
        rec.check()
        p = rec.embed(load_batch([r.path for r in probes], ctx.image_size))
        g = self.gallery_embeddings(ctx, gallery)
        # the recognizer's own metric, one block of probe rows at a time: no probes x gallery matrix
        return StreamedSimilarity(lambda rows: rec.similarity(p[rows], g), (len(p), len(g)))
