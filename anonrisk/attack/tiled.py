"""Tiled contrastive losses: the losses of ``losses.py`` without ever holding an N x M similarity matrix.

Both objectives are ``mean_i [logsumexp_j s_ij - mean_{j in pos(i)} s_ij]`` per direction, with
``s = x y^T / t``. The positive term is linear in ``s``, so it needs no matrix at all: for pairs it is the
row-wise dot product, for identities it is the dot product of per-identity sums (``sum_i x_i . y_j`` over
positives = ``X_l . Y_l`` for the identity sums ``X_l``, ``Y_l``). Only the log-sum-exp couples every
row with every column, and ``_TiledLogSumExp`` computes it tile by tile with an online log-sum-exp
(Inf-CL, arXiv 2410.17243): forward keeps only the (N,) log-sum-exp vectors, backward recomputes each tile
of ``s`` and of the softmax from them. Memory is O((N + M) d + tile^2); compute is one extra tile matmul
per pass over the untiled loss. The single-process symmetric loss gets both directions from one pass
(the row log-sum-exp of ``s`` and of ``s^T`` from the same tiles).

Precision: on CUDA the tile matmuls run in bf16 with fp32 output (``torch.mm(..., out_dtype=float32)``)
and the log-sum-exp and gradients accumulate in fp32; elsewhere (and for float64 inputs) everything stays
in the input dtype. ``compute_dtype`` overrides the matmul dtype. The temperature may be a learnable
tensor: its gradient is exact, from ``dL/dt = -(1/t) sum_i x_i . dL/dx_i`` (no extra tile work).

Across ranks, ``tiled_gathered_loss`` mirrors ``gathered_contrastive_loss``: the (n, d) embeddings are
gathered with gradient (O(N d), never N x N) and each rank computes its own rows against every column.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from anonrisk.attack.losses import gather_no_grad, gather_with_grad

DEFAULT_TILE = {"cuda": 4096, "cpu": 1024}  # fp32 tiles of 64 MB on a GPU, 4 MB on a CPU


def default_tile(device: torch.device | str) -> int:
    return DEFAULT_TILE.get(torch.device(device).type, DEFAULT_TILE["cpu"])


def _dtypes(x: torch.Tensor, compute_dtype: Optional[torch.dtype]) -> tuple[torch.dtype, torch.dtype]:
    """(matmul dtype, accumulation dtype) for inputs like ``x``."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if x.is_cuda else acc
    return compute_dtype, acc


def _mm(p: torch.Tensor, q: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """p @ q with the result in ``acc``; half-precision inputs on CUDA accumulate and return fp32 directly."""
    if p.dtype == acc:
        return p @ q
    if p.device.type in ("cuda", "meta") and acc == torch.float32 and p.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(p, q, out_dtype=acc)
    return (p @ q).to(acc)  # CPU half precision: the matmul accumulates in fp32 but rounds its output


def _tiles(n: int, tile: int):
    return [(i, min(i + tile, n)) for i in range(0, n, tile)]


class _TiledLogSumExp(torch.autograd.Function):
    """``lse_r[i] = logsumexp_j s_ij`` and, with ``cols``, ``lse_c[j] = logsumexp_i s_ij``, for
    ``s = x y^T / t``, one (tile x tile) block of ``s`` at a time. Saves only x, y, t and the two vectors."""

    @staticmethod
    def forward(ctx, x, y, t, cols: bool, tile: int, compute_dtype: Optional[torch.dtype]):
        cd, acc = _dtypes(x, compute_dtype)
        inv_t = (1.0 / t.detach()).to(acc).reshape(())
        xc, yc = x.detach().to(cd), y.detach().to(cd)  # cast once per pass: O((N + M) d), never per tile pair
        lse_r = torch.full((x.shape[0],), -torch.inf, dtype=acc, device=x.device)
        lse_c = torch.full((y.shape[0] if cols else 0,), -torch.inf, dtype=acc, device=x.device)
        col_tiles = _tiles(y.shape[0], tile)
        for i0, i1 in _tiles(x.shape[0], tile):
            row = lse_r[i0:i1]
            for j0, j1 in col_tiles:
                s = _mm(xc[i0:i1], yc[j0:j1].t(), acc).mul_(inv_t)
                row = torch.logaddexp(row, torch.logsumexp(s, 1))
                if cols:
                    lse_c[j0:j1] = torch.logaddexp(lse_c[j0:j1], torch.logsumexp(s, 0))
            lse_r[i0:i1] = row
        ctx.save_for_backward(x, y, t, lse_r, lse_c)
        ctx.cols, ctx.tile, ctx.compute_dtype = cols, tile, compute_dtype
        return lse_r, lse_c

    @staticmethod
    @once_differentiable
    def backward(ctx, g_r, g_c):
        x, y, t, lse_r, lse_c = ctx.saved_tensors
        need_x, need_y, need_t = ctx.needs_input_grad[:3]
        cd, acc = _dtypes(x, ctx.compute_dtype)
        inv_t = (1.0 / t).to(acc).reshape(())
        xc, yc = x.to(cd), y.to(cd)
        g_r = g_r.to(acc)[:, None]
        g_c = g_c.to(acc)[None, :] if ctx.cols else None
        gx = torch.zeros(x.shape, dtype=acc, device=x.device) if (need_x or need_t) else None
        gy = torch.zeros(y.shape, dtype=acc, device=y.device) if need_y else None
        col_tiles = _tiles(y.shape[0], ctx.tile)
        for i0, i1 in _tiles(x.shape[0], ctx.tile):
            xi = xc[i0:i1]
            for j0, j1 in col_tiles:
                s = _mm(xi, yc[j0:j1].t(), acc).mul_(inv_t)
                # dL/ds_ij = g_r_i softmax_j(s)_ij (+ g_c_j softmax_i(s)_ij): rebuilt from the saved lse
                w = (s - lse_r[i0:i1, None]).exp_().mul_(g_r[i0:i1])
                if g_c is not None:
                    w += s.sub_(lse_c[None, j0:j1]).exp_().mul_(g_c[:, j0:j1])
                w = w.to(cd)
                if gx is not None:
                    gx[i0:i1] += _mm(w, yc[j0:j1], acc)
                if gy is not None:
                    gy[j0:j1] += _mm(w.t(), xi, acc)
        grad_t = None
        if gx is not None:
            gx.mul_(inv_t)
        if gy is not None:
            gy.mul_(inv_t)
        if need_t:  # ds/dt = -s/t, so dL/dt = -(1/t) sum_i x_i . dL/dx_i
            grad_t = (-(x.to(acc) * gx).sum() * inv_t).reshape(t.shape).to(t.dtype)
        return (gx.to(x.dtype) if need_x else None, gy.to(y.dtype) if need_y else None, grad_t, None, None, None)


def tiled_logsumexp(x: torch.Tensor, y: torch.Tensor, temperature: float | torch.Tensor, cols: bool = False,
                    tile: Optional[int] = None, compute_dtype: Optional[torch.dtype] = None):
    """(logsumexp over columns of ``x y^T / t`` for each row, and with ``cols`` over rows for each column
    (else an empty tensor)), without the (N, M) matrix. Differentiable in x, y and a tensor temperature."""
    tile = default_tile(x.device) if tile is None else int(tile)
    if tile < 1:
        raise ValueError(f"tile={tile}: the tile size must be a positive number of rows")
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"embeddings of shapes {tuple(x.shape)} and {tuple(y.shape)}: expected (N, D) and (M, D)")
    t = _temperature(temperature, x)
    return _TiledLogSumExp.apply(x, y, t, cols, tile, compute_dtype)


def _temperature(temperature: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature of shape {tuple(temperature.shape)}: expected one value")
        return temperature
    return torch.tensor(float(temperature), dtype=like.dtype, device=like.device)


def _scalar_t(temperature: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The temperature as a 0-d tensor (so losses are 0-d, as ``contrastive_loss``'s are)."""
    return _temperature(temperature, like).reshape(())


def _positive_logit_mean(x: torch.Tensor, y: torch.Tensor, lx: torch.Tensor, ly: torch.Tensor) -> torch.Tensor:
    """``mean_i mean_{j: ly_j == lx_i} x_i . y_j`` via per-identity sums: O((N + M) d), no (N, M) mask.
    A row whose identity has no column gives NaN (0/0), as ``contrastive_loss`` does."""
    ids, inverse = torch.unique(torch.cat([lx, ly]), return_inverse=True)
    ix, iy = inverse[: lx.shape[0]], inverse[lx.shape[0]:]
    sum_x = x.new_zeros(ids.shape[0], x.shape[1]).index_add(0, ix, x)
    sum_y = y.new_zeros(ids.shape[0], y.shape[1]).index_add(0, iy, y)
    count_y = torch.bincount(iy, minlength=ids.shape[0]).to(x.dtype)
    return ((sum_x * sum_y).sum(1) / count_y).sum() / lx.shape[0]


def tiled_contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float | torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    labels_b: Optional[torch.Tensor] = None,
    tile: Optional[int] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``contrastive_loss`` (same arguments, same value and gradients) computed in tiles of ``tile`` rows
    and columns (default: ``default_tile(a.device)``). Without labels the positives are the diagonal."""
    t = _scalar_t(temperature, a)
    lse_ab, lse_ba = tiled_logsumexp(a, b, t, cols=True, tile=tile, compute_dtype=compute_dtype)
    if labels is None:
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"pairs need as many rows in a as in b, got {a.shape[0]} and {b.shape[0]}")
        return 0.5 * (lse_ab.mean() + lse_ba.mean()) - (a * b).sum(1).mean().to(lse_ab.dtype) / t
    labels_b = labels if labels_b is None else labels_b
    pos_ab = _positive_logit_mean(a, b, labels, labels_b) / t
    pos_ba = _positive_logit_mean(b, a, labels_b, labels) / t
    return 0.5 * ((lse_ab.mean() - pos_ab) + (lse_ba.mean() - pos_ba))


def tiled_local_rows_loss(
    a_local: torch.Tensor,
    b_local: torch.Tensor,
    a_all: torch.Tensor,
    b_all: torch.Tensor,
    temperature: float | torch.Tensor,
    labels_local: Optional[torch.Tensor] = None,
    labels_all: Optional[torch.Tensor] = None,
    tile: Optional[int] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``local_rows_loss`` in tiles: this rank's anonymized rows against every original and its originals
    against every anonymized image. Without labels, the only positive of ``a_local[i]`` is ``b_local[i]``
    (pairs: no rank offset needed)."""
    t = _scalar_t(temperature, a_local)
    lse_ab, _ = tiled_logsumexp(a_local, b_all, t, tile=tile, compute_dtype=compute_dtype)
    lse_ba, _ = tiled_logsumexp(b_local, a_all, t, tile=tile, compute_dtype=compute_dtype)
    if labels_local is None:
        pos = (a_local * b_local).sum(1).mean().to(lse_ab.dtype) / t
        return 0.5 * (lse_ab.mean() + lse_ba.mean()) - pos
    pos_ab = _positive_logit_mean(a_local, b_all, labels_local, labels_all) / t
    pos_ba = _positive_logit_mean(b_local, a_all, labels_local, labels_all) / t
    return 0.5 * ((lse_ab.mean() - pos_ab) + (lse_ba.mean() - pos_ba))


def tiled_gathered_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float | torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    group=None,
    tile: Optional[int] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``gathered_contrastive_loss`` in tiles: this rank's rows of the global-batch loss. The mean over
    ranks is the single-process ``contrastive_loss`` of the global batch, and so is its gradient once data
    parallelism averages it. One rank (or no process group): ``tiled_contrastive_loss``."""
    a_all, b_all = gather_with_grad(a, group), gather_with_grad(b, group)
    if a_all is a:  # one process: both directions from one pass over the tiles
        return tiled_contrastive_loss(a, b, temperature, labels, tile=tile, compute_dtype=compute_dtype)
    labels_all = None if labels is None else gather_no_grad(labels, group)
    return tiled_local_rows_loss(a, b, a_all, b_all, temperature, labels, labels_all, tile, compute_dtype)
