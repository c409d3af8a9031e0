"""Evaluation without a memory wall (issue 18, item 2): every attack hands the scorer a function of probe
rows (EmbeddingSimilarity for the trained encoder, StreamedSimilarity for the edge matcher and the
recognizer) instead of a probes x gallery matrix; the scorer reads it in blocks of rows, and the metrics are
exactly those of the dense matrix the attacks returned before."""

import numpy as np
import pytest
import torch
from PIL import Image

from anonrisk.attack.base import AttackContext
from anonrisk.config.schema import EvaluateConfig, TrainConfig
from anonrisk.data.records import FaceRecord
from anonrisk.evaluate.evaluate import identity_indices, score_similarity
from anonrisk.evaluate.protocols import EmbeddingSimilarity, StreamedSimilarity, score_protocols

SIZE, IDS, PER = 32, 6, 3
CFG = EvaluateConfig(protocols=["full-ref", "few-ref", "single-ref"], modes=["exclude-source", "linkage"], few_ref_k=2, bootstrap=50)


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """(probes, gallery): synthetic faces on disk and their blurred copies (the anonymized test split)."""
    from PIL import ImageFilter

    from anonrisk.data.synthetic import render_image

    root = tmp_path_factory.mktemp("faces")
    gallery, probes = [], []
    for i in range(IDS):
        for j in range(PER):
            rid = f"id{i}/{j}.png"
            img = Image.fromarray(render_image(0, i, j, SIZE))
            for kind, out, im in (("orig", gallery, img), ("anon", probes, img.filter(ImageFilter.GaussianBlur(1.0)))):
                path = root / kind / rid
                path.parent.mkdir(parents=True, exist_ok=True)
                im.save(path)
                out.append(FaceRecord(rid, f"id{i}", str(path), "test"))
    return probes, gallery


class Rows:
    """Wraps a row similarity and records the largest block of rows it was asked for."""

    def __init__(self, sim):
        self.sim, self.shape, self.largest = sim, sim.shape, 0

    def __call__(self, rows):
        self.largest = max(self.largest, len(rows))
        return self.sim(rows)


def assert_streams_like(sim, dense: torch.Tensor, probes, gallery):
    """``sim`` is no matrix, its rows are ``dense``'s, and scoring it (whole, and 4 probe rows at a time)
    gives the dense matrix's metrics exactly."""
    assert not isinstance(sim, torch.Tensor) and tuple(sim.shape) == tuple(dense.shape)
    assert torch.equal(sim(np.arange(len(probes))), dense.float())
    assert score_similarity(sim, probes, gallery, CFG) == score_similarity(dense, probes, gallery, CFG)
    g_ident, names = identity_indices(gallery)
    p_ident = np.array([names.index(r.identity) for r in probes])
    p_src = np.array([[g.id for g in gallery].index(r.id) for r in probes])
    rows = Rows(sim)
    got = score_protocols(rows, p_ident, p_src, g_ident, block_elems=4 * len(gallery))
    ref = score_protocols(dense, p_ident, p_src, g_ident)
    assert rows.largest == 4  # never more than a block of probe rows x the gallery
    for key in ref:
        assert np.array_equal(got[key].ranks, ref[key].ranks), key


@pytest.mark.parametrize("score", ["ncc", "chamfer"])
def test_the_edge_attack_streams_its_similarity(faces, score):
    from anonrisk.attack.edge import EdgeMatchAttack, EdgeParams, chamfer_similarity, edge_maps, ncc_features
    from anonrisk.data.io import load_batch

    probes, gallery = faces
    attack = EdgeMatchAttack(EdgeParams(score=score))
    sim = attack.similarity(AttackContext(gallery, SIZE), probes, gallery)
    pm, gm = (edge_maps(load_batch([r.path for r in rs], SIZE), "canny", 1.0) for rs in (probes, gallery))
    # the matrix the attack returned before streaming
    dense = chamfer_similarity(pm, gm) if score == "chamfer" else ncc_features(pm, 1.5) @ ncc_features(gm, 1.5).T
    assert_streams_like(sim, torch.from_numpy(dense).float(), probes, gallery)


def test_the_recognizer_attack_streams_its_own_metric(faces, tmp_path):
    """A euclidean recognizer (dlib's metric, the one that is not a dot product) through the real attack."""
    from anonrisk.attack.recognizer import RecognizerAttack, RecognizerParams
    from anonrisk.evaluate.recognizers import RECOGNIZERS, Recognizer
    from anonrisk.stages import StageDir

    if "test-pixels" not in RECOGNIZERS:
        @RECOGNIZERS.register("test-pixels")
        class PixelRecognizer(Recognizer):  # descriptors: downsampled pixels (a real, if weak, recognizer)
            metric = "euclidean"

            def embed(self, images):
                return images[:, ::4, ::4].reshape(len(images), -1).astype(np.float32) / 255

    probes, gallery = faces
    attack = RecognizerAttack(RecognizerParams(model="test-pixels"))
    ctx = AttackContext(gallery, SIZE, caches={"embed": StageDir(str(tmp_path), "embed", "x")})
    sim = attack.similarity(ctx, probes, gallery)
    rec = attack.recognizer
    from anonrisk.data.io import load_batch

    p, g = (rec.embed(load_batch([r.path for r in rs], SIZE)) for rs in (probes, gallery))
    assert_streams_like(sim, torch.from_numpy(rec.similarity(p, g)).float(), probes, gallery)


def test_the_trained_attack_hands_the_scorer_embeddings(faces, tmp_path):
    from anonrisk.attack.embed import embed_records
    from anonrisk.attack.train import load_encoder, train_attack
    from anonrisk.attack.trained import ContrastiveAttack
    from anonrisk.stages import StageDir

    probes, gallery = faces
    cfg = TrainConfig(backbone="test_convnext", input="rgb", embed_dim=16, batch_size=6, steps=2, augment=False)
    stage = StageDir(str(tmp_path), "train", "tiny")
    as_train = lambda rs: [FaceRecord(r.id, r.identity, r.path, "train") for r in rs]  # noqa: E731
    train_attack(cfg, as_train(probes), as_train(gallery), SIZE, stage, "cpu", progress=False)
    attack = ContrastiveAttack(ContrastiveAttack.Params())
    sim = attack.similarity(AttackContext(gallery, SIZE, train_stage=stage, train_config=cfg), probes, gallery)
    assert isinstance(sim, EmbeddingSimilarity)
    model = load_encoder(cfg, stage / "encoder.safetensors", "cpu")
    dense = embed_records(model, probes, SIZE) @ embed_records(model, gallery, SIZE).t()  # before: the matrix
    assert_streams_like(sim, dense, probes, gallery)


def test_streamed_similarity_takes_numpy_or_torch_rows():
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    for fn in (lambda rows: x[rows], lambda rows: torch.from_numpy(x[rows])):
        s = StreamedSimilarity(fn, x.shape)
        out = s(np.array([2, 0]))
        assert s.shape == (3, 4) and out.dtype == torch.float32 and out.tolist() == [x[2].tolist(), x[0].tolist()]
