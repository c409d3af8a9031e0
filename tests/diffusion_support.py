"""What the diffusion test modules share: one intra-op thread while they run, and synthetic faces."""

import numpy as np
import pytest
import torch

from anonrisk.data.synthetic import render_image


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two shared cores: one intra-op thread is several times faster than oversubscribing them.
    Import it into a test module to apply it there (an autouse fixture of that module)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic_faces(n: int, size: int = 64) -> np.ndarray:
    """``n`` identities' first image, ``size`` px: a uint8 batch (n, size, size, 3)."""
    return np.stack([render_image(0, identity, 0, size) for identity in range(n)])
