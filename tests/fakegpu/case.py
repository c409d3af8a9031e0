"""The training case of tests/test_device_discipline.py, shared by its ranks and its one-process reference:
tiny pairs written as PNG files and an attack config that reaches every collective of the training loop
(identity labels gathered, GradCache chunks under DDP no_sync, learnable temperature, augmentation and the
Sobel edge channel computed on the engine's device). SGD keeps the weight comparison tight: AdamW divides each
near-zero gradient element by its own size, turning float summation order into lr-sized differences."""

from pathlib import Path

import numpy as np

IMAGE_SIZE = 32


def pairs(root: Path, identities: int = 6, per_identity: int = 2):
    from PIL import Image

    from anonrisk.data.records import FaceRecord

    rng = np.random.default_rng(0)
    anon, orig = [], []
    for i in range(identities):
        for j in range(per_identity):
            for kind, out in (("anon", anon), ("orig", orig)):
                path = root / "data" / kind / f"{i}_{j}.png"
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(path)
                out.append(FaceRecord(f"p{i}/{j}", f"p{i}", str(path), "train"))
    return anon, orig


def attack_config():
    from anonrisk.config.schema import TrainConfig

    return TrainConfig(backbone="test_convnext", input="rgb+edges", embed_dim=8, batch_size=8, per_identity=2, steps=3, lr=0.05, optimizer="sgd",
                        grad_cache_chunk=2, learn_temperature=True, checkpoint_every=1000, seed=3)
