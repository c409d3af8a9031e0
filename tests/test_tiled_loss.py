"""The tiled contrastive loss equals the untiled one (value and gradients in a, b and a learnable
temperature, float64, ragged tiles), never allocates N x N, composes across two real gloo ranks and with
GradCache."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from anonrisk.attack.losses import contrastive_loss, local_rows_loss
from anonrisk.attack.tiled import (_mm, default_tile, tiled_contrastive_loss, tiled_gathered_loss,
                                   tiled_local_rows_loss)

HERE = Path(__file__).parent
TOL = 1e-12  # float64: only summation order differs between tiled and untiled


def embeddings(n, d=5, seed=0, m=None):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    b = F.normalize(torch.randn(n if m is None else m, d, generator=g, dtype=torch.float64), dim=1)
    return a, b


def uneven_labels(n, seed=0):
    """Identities with 1 to 4 images each, shuffled (rows of one identity are not adjacent)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 5, (n,), generator=g)
    labels = torch.repeat_interleave(torch.arange(n), sizes)[:n]
    return labels[torch.randperm(n, generator=g)] * 7 + 3  # ids need not be 0..K-1


def loss_and_grads(fn, a0, b0, **kw):
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    t = torch.tensor([0.07], dtype=torch.float64, requires_grad=True)  # shape (1,), as the engines pass it
    loss = fn(a, b, t, **kw)
    return (loss, *torch.autograd.grad(loss, (a, b, t)))


def assert_same(ref, got, tol=TOL):
    assert got[0].shape == ref[0].shape == ()
    for name, r, g in zip(("loss", "grad_a", "grad_b", "grad_t"), ref, got):
        assert (r - g).abs().max().item() < tol, (name, (r - g).abs().max().item())
    assert ref[3].abs().item() > 1e-3 and ref[1].abs().max() > 1e-3  # not a comparison between zeros


@pytest.mark.parametrize("n", [1, 5, 12, 13])
@pytest.mark.parametrize("tile", [1, 4, 5, 64])
@pytest.mark.parametrize("mode", ["pair", "identity"])
def test_tiled_loss_and_gradients_equal_the_untiled_loss(n, tile, mode):
    """Ragged tiles (13 rows in tiles of 4 or 5), one tile larger than the batch (64), single rows."""
    a, b = embeddings(n, seed=n)
    labels = None if mode == "pair" else uneven_labels(n, seed=n)
    ref = loss_and_grads(contrastive_loss, a, b, labels=labels)
    got = loss_and_grads(tiled_contrastive_loss, a, b, labels=labels, tile=tile)
    if n == 1:  # one pair: loss and gradients are exactly zero in both
        assert all(x.abs().max().item() < TOL for x in ref + got)
        return
    assert_same(ref, got)


@pytest.mark.parametrize("mode", ["pair", "identity"])
def test_row_blocks_are_read_as_one_matrix_without_concatenation(mode):
    """``a`` and ``b`` as lists of uneven row blocks (as GradCache's chunks arrive; tiles of 4 cross block
    boundaries): same loss and gradients as the concatenated tensors, each block getting its own rows'."""
    a0, b0 = embeddings(13, seed=6)
    labels = None if mode == "pair" else uneven_labels(13, seed=6)
    ref = loss_and_grads(contrastive_loss, a0, b0, labels=labels)
    sizes = [3, 1, 5, 4]
    a_blocks = [x.clone().requires_grad_() for x in a0.split(sizes)]
    b_blocks = [x.clone().requires_grad_() for x in b0.split([6, 7])]
    t = torch.tensor([0.07], dtype=torch.float64, requires_grad=True)
    loss = tiled_contrastive_loss(a_blocks, b_blocks, t, labels, tile=4)
    grads = torch.autograd.grad(loss, [*a_blocks, *b_blocks, t])
    got = (loss, torch.cat(grads[:4]), torch.cat(grads[4:6]), grads[6])
    assert_same(ref, got)


def test_identity_mode_with_more_columns_than_rows_and_a_float_temperature():
    """``b`` with more rows than ``a`` (``labels_b`` for its columns), as ``contrastive_loss`` allows."""
    a, b = embeddings(6, m=11, seed=3)
    labels, labels_b = torch.tensor([1, 1, 2, 5, 5, 5]), torch.tensor([5, 1, 2, 2, 1, 1, 5, 2, 2, 5, 5])
    for tile in (2, 3, 16):
        ref, got = [], []
        for fn, kw, out in ((contrastive_loss, {}, ref), (tiled_contrastive_loss, {"tile": tile}, got)):
            x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
            loss = fn(x, y, 0.2, labels, labels_b, **kw)
            out += [loss, *torch.autograd.grad(loss, (x, y))]
        assert max((r - g).abs().max().item() for r, g in zip(ref, got)) < TOL
    # a column identity missing from the rows (9): no positive for that row of b -> NaN in both, as 0/0
    odd = labels_b.clone()
    odd[4] = 9
    assert contrastive_loss(a, b, 0.2, labels, odd).isnan() and tiled_contrastive_loss(a, b, 0.2, labels, odd, tile=4).isnan()


def test_multi_positive_labels_change_the_loss():
    """The identity mode really uses the labels: with all-unique labels it is the pair loss, with shared
    identities it is not."""
    a, b = embeddings(9, seed=4)
    pair = tiled_contrastive_loss(a, b, 0.1, tile=4)
    assert abs(tiled_contrastive_loss(a, b, 0.1, torch.arange(9) * 3, tile=4) - pair) < TOL
    assert abs(tiled_contrastive_loss(a, b, 0.1, uneven_labels(9), tile=4) - pair) > 1e-3


@pytest.mark.parametrize("mode", ["pair", "identity"])
def test_ranks_simulated_by_slicing_give_the_global_loss_and_gradients(mode):
    """Each simulated rank's tiled local rows: the mean over ranks is the global loss, gradients included,
    and each rank's share equals the untiled ``local_rows_loss``."""
    a0, b0 = embeddings(12, seed=5)
    labels = uneven_labels(12, seed=5)
    ref = loss_and_grads(contrastive_loss, a0, b0, labels=None if mode == "pair" else labels)
    world, per = 3, 4
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    t = torch.tensor([0.07], dtype=torch.float64, requires_grad=True)
    parts = []
    for r in range(world):
        rows = slice(r * per, (r + 1) * per)
        lab_local, lab_all = (None, None) if mode == "pair" else (labels[rows], labels)
        part = tiled_local_rows_loss(a[rows], b[rows], a, b, t, lab_local, lab_all, tile=3, offset=r * per)
        untiled = local_rows_loss(a[rows], b[rows], a, b, t, labels[rows] if mode == "identity" else torch.arange(12)[rows],
                                  labels if mode == "identity" else torch.arange(12))
        assert abs(part.item() - untiled.item()) < TOL
        parts.append(part)
    total = torch.stack(parts).mean()
    assert_same(ref, (total, *torch.autograd.grad(total, (a, b, t))))


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor any aten op returns while active (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), func
        return out


@pytest.mark.parametrize("mode", ["pair", "identity"])
def test_tiled_loss_never_allocates_an_n_by_n_tensor(mode):
    """N = 1024, d = 32, tile 128: every tensor made in forward and backward holds at most
    max(N d, tile^2) = 32k elements; the untiled loss (the control) makes N^2 = 1M-element ones."""
    n, d, tile = 1024, 32, 128
    g = torch.Generator().manual_seed(0)
    a0, b0 = (F.normalize(torch.randn(n, d, generator=g), dim=1) for _ in range(2))
    labels = None if mode == "pair" else torch.randint(0, 300, (n,), generator=g)
    seen = {}
    for name, fn, kw in (("tiled", tiled_contrastive_loss, {"tile": tile}), ("untiled", contrastive_loss, {})):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        t = torch.tensor([0.1], requires_grad=True)
        with LargestOutput() as mode_:
            fn(a, b, t, labels, **kw).backward()
        seen[name] = mode_.numel, mode_.op
        assert a.grad is not None and t.grad is not None
    assert seen["tiled"][0] <= max(n * d, tile * tile), seen
    assert seen["untiled"][0] >= n * n, seen  # the recorder does see the matrix where there is one


def test_bf16_matmuls_stay_close_and_the_cuda_call_is_well_formed():
    """compute_dtype=bf16 (the CUDA default) on the CPU: loss within 2e-2 of fp32, gradients within 5e-2
    relative. The fp32-output matmul used on CUDA (``torch.mm(..., out_dtype=float32)``) is checked on
    meta tensors, which accept the same call."""
    g = torch.Generator().manual_seed(1)
    a0, b0 = (F.normalize(torch.randn(300, 32, generator=g), dim=1) for _ in range(2))
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        loss = tiled_contrastive_loss(a, b, 0.1, tile=64, compute_dtype=dt)
        loss.backward()
        assert loss.dtype == torch.float32 and a.grad.dtype == torch.float32
        out[dt] = loss.item(), a.grad
    assert abs(out[torch.float32][0] - out[torch.bfloat16][0]) < 2e-2
    ga, gb = out[torch.float32][1], out[torch.bfloat16][1]
    assert (ga - gb).norm() / ga.norm() < 5e-2
    p = torch.empty(8, 4, dtype=torch.bfloat16, device="meta")
    assert _mm(p, p.t(), torch.float32).dtype == torch.float32
    assert default_tile("cuda") == 4096 and default_tile("cpu") == 1024


def test_bad_arguments_are_one_line_errors():
    a, b = embeddings(4, m=5)
    with pytest.raises(ValueError, match="tile=0"):
        tiled_contrastive_loss(a, a, 0.1, tile=0)
    with pytest.raises(ValueError, match="pairs need as many rows"):
        tiled_contrastive_loss(a, b, 0.1)
    with pytest.raises(ValueError, match="one value"):
        tiled_contrastive_loss(a, a, torch.ones(2))
    with pytest.raises(ValueError, match="row blocks of equal D"):
        tiled_contrastive_loss([a, a[:, :3]], [a, a], 0.1)


def test_grad_cache_with_the_tiled_loss_equals_plain_backprop_with_the_untiled_loss():
    """GradCache (chunks of 2 pairs) + tiled loss (tiles of 3: ragged), on concatenated embeddings and on
    the chunks as row blocks, vs one full-batch backward + the untiled loss, on a LayerNorm ConvNeXt with a
    learnable temperature: parameter gradients within 1e-5 (fp32: GradCache caches fp32 embeddings)."""
    from anonrisk.attack.engine_base import ContrastiveModel
    from anonrisk.attack.gradcache import full_batch_step, grad_cache_step
    from anonrisk.attack.model import Encoder

    torch.manual_seed(0)
    model = ContrastiveModel(Encoder("test_convnext", 16, input="rgb"), 0.1, True).train()
    g = torch.Generator().manual_seed(1)
    anon, orig = torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g)
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4])

    def loss_fn(fn, **kw):
        def f(embs, t):
            a = torch.cat([e[: len(e) // 2] for e in embs])
            b = torch.cat([e[len(e) // 2:] for e in embs])
            return fn(a, b, t, labels, **kw)
        return f

    def grads(step, inputs, f):
        model.zero_grad(set_to_none=True)
        loss = step(model, inputs, f, lambda x: x.backward())
        return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref = grads(full_batch_step, torch.cat([anon, orig]), loss_fn(contrastive_loss))
    chunks = [torch.cat([anon[i:i + 2], orig[i:i + 2]]) for i in range(0, 8, 2)]

    def blocks_fn(embs, t):  # the chunks' halves as row blocks: no concatenated copy of the batch
        return tiled_gathered_loss([e[: len(e) // 2] for e in embs], [e[len(e) // 2:] for e in embs], t, labels, tile=3)

    for f in (loss_fn(tiled_gathered_loss, tile=3), blocks_fn):
        got_loss, got = grads(grad_cache_step, chunks, f)
        assert set(got) == set(ref) and "log_t" in got
        assert abs(ref_loss - got_loss) < 1e-5
        worst = max((ref[k] - got[k]).abs().max().item() for k in ref)
        assert worst < 1e-5, worst
    assert max(v.abs().max().item() for v in ref.values()) > 1e-3


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tiled_gathered_loss_on_two_gloo_ranks_equals_the_single_process(tmp_path):
    """Two processes, a real gloo group: each rank's tiled local rows. Mean of the ranks' losses = the
    single-process untiled loss; the ranks' embedding gradients (summed over ranks by the gather's backward)
    concatenated / world, and the mean of their temperature gradients (what DDP's averaging gives), equal
    the single-process gradients (float64, 1e-12)."""
    sys.path.insert(0, str(HERE))
    import tiled_dist_worker as worker

    port = str(free_port())
    keep = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = [subprocess.Popen([sys.executable, str(HERE / "tiled_dist_worker.py"), str(tmp_path / "out")],
                              env={**keep, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": port, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)},
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()[-3000:]
    outs = [torch.load(tmp_path / f"out.{r}.pt", weights_only=True) for r in range(2)]
    assert [o["world"] for o in outs] == [2, 2] and outs[1]["rank"] == 1
    a0, b0 = worker.global_embeddings()
    for name, labels in (("identity", worker.LABELS), ("pair", None)):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        t = torch.tensor([0.1], dtype=torch.float64, requires_grad=True)
        loss = contrastive_loss(a, b, t, labels)
        ga, gb, gt = torch.autograd.grad(loss, (a, b, t))
        mean = sum(o[name]["loss"] for o in outs) / 2
        assert abs(mean - loss.item()) < TOL, (name, mean, loss.item())
        assert abs(outs[0][name]["loss"] - outs[1][name]["loss"]) > 1e-4  # the ranks' shares differ
        got_a = torch.cat([o[name]["grad_a"] for o in outs]) / 2
        got_b = torch.cat([o[name]["grad_b"] for o in outs]) / 2
        got_t = sum(o[name]["grad_t"] for o in outs) / 2
        assert (got_a - ga).abs().max() < TOL and (got_b - gb).abs().max() < TOL, name
        assert (got_t - gt).abs().max() < TOL and gt.abs().item() > 1e-3, (name, got_t, gt)
