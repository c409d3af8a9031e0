"""Training pairs (anonymized image, its original) and a step-indexed, identity-unique batch sampler.

Everything random during training is a function of (seed, step): the batch drawn at step s, its
augmentation. A run resumed at step s therefore continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from anonrisk.data.io import load_image
from anonrisk.data.records import FaceRecord
from anonrisk.errors import ConfigError


class PairSource:
    """Pairs of (anonymized, original) images of the same record; held in memory when they fit under
    ``cache_gb``, read from disk per batch otherwise."""

    def __init__(self, anonymized: Sequence[FaceRecord], originals: Sequence[FaceRecord], image_size: int, cache_gb: float = 2.0):
        by_id = {r.id: r for r in originals}
        self.anon_paths = [r.path for r in anonymized]
        self.orig_paths = [by_id[r.id].path for r in anonymized]
        idents = sorted({r.identity for r in anonymized})
        index = {k: i for i, k in enumerate(idents)}
        self.identity = np.array([index[r.identity] for r in anonymized])
        self.num_identities = len(idents)
        self.image_size = image_size
        self.cached = 2 * len(anonymized) * 3 * image_size**2 <= cache_gb * 2**30
        if self.cached:
            self.anon = self._load(self.anon_paths)
            self.orig = self._load(self.orig_paths)

    def _load(self, paths: Sequence[str]) -> torch.Tensor:
        with ThreadPoolExecutor(4) as pool:
            arrays = list(pool.map(lambda p: load_image(p, self.image_size), paths))
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return len(self.anon_paths)

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cached:
            t = torch.as_tensor(idx)
            return self.anon[t], self.orig[t]
        return self._load([self.anon_paths[i] for i in idx]), self._load([self.orig_paths[i] for i in idx])


class IdentitySampler:
    """Step s draws ``batch_size // per_identity`` distinct identities and ``per_identity`` images of each,
    from (seed, s) alone. ``per_identity=1`` keeps identities unique (each image's only positive is its own
    pair); more gives the multi-positive loss same-identity positives to learn from."""

    def __init__(self, identity: np.ndarray, batch_size: int, seed: int, per_identity: int = 1):
        self.members = [np.flatnonzero(identity == i) for i in range(int(identity.max()) + 1)]
        if batch_size % per_identity:
            raise ConfigError(f"train.batch_size={batch_size} is not divisible by train.per_identity={per_identity}")
        n_ids = batch_size // per_identity
        if n_ids > len(self.members):
            raise ConfigError(
                f"train.batch_size={batch_size} needs {n_ids} distinct identities per batch "
                f"(per_identity={per_identity}) but training has {len(self.members)}: lower the batch size, "
                "raise train.per_identity, or use more identities"
            )
        self.n_ids, self.per_identity, self.seed = n_ids, per_identity, seed

    def __call__(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        ids = rng.choice(len(self.members), self.n_ids, replace=False)
        m = self.per_identity
        return np.concatenate([rng.choice(self.members[i], m, replace=len(self.members[i]) < m) for i in ids])


def augment_params(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The random draws of ``augment`` for ``n`` images, per image (rows), so a rank can draw them for the
    whole global batch and apply its own rows: the same image gets the same augmentation whatever the
    number of ranks."""
    u = lambda *s: torch.rand(*s, generator=generator) * 2 - 1  # noqa: E731
    return {
        "scale": u(n),
        "shift": u(n, 2),
        "perm": torch.argsort(torch.rand(n, 3, generator=generator), dim=1),
        "gray": torch.rand(n, generator=generator) < 0.3,
        "gain": u(n, 1, 1, 1),
        "bias": u(n, 1, 1, 1),
    }


def apply_augment(x: torch.Tensor, p: dict[str, torch.Tensor], max_shift: float = 0.06, max_scale: float = 0.06) -> torch.Tensor:
    n = x.shape[0]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 + max_scale * p["scale"]
    theta[:, :, 2] = max_shift * 2 * p["shift"]
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)
    perm = p["perm"].to(x.device)
    x = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
    gray = p["gray"].to(x.device)
    x = torch.where(gray[:, None, None, None], x.mean(1, keepdim=True).expand_as(x), x)
    return x * (1 + 0.2 * p["gain"].to(x.device)) + 0.2 * p["bias"].to(x.device)


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: float = 0.06, max_scale: float = 0.06) -> torch.Tensor:
    """Random small translation/scale, colour channel permutation, grayscale, brightness/contrast per image
    (float NCHW). Colour is nuisance to an identity attack: the permutation and grayscale teach that."""
    return apply_augment(x, augment_params(x.shape[0], generator), max_shift, max_scale)
