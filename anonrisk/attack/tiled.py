"""Tiled contrastive losses: the losses of ``losses.py`` without ever holding an N x M similarity matrix.

Both objectives are ``mean_i [logsumexp_j s_ij - mean_{j in pos(i)} s_ij]`` per direction, with
``s = x y^T / t``. The positive term is linear in ``s``, so it needs no matrix: for pairs it is a row-wise
dot product, for identities ``x_i . Y_id(i) / count`` with ``Y_l`` the sum of identity l's columns. Only the
log-sum-exp couples every row with every column: ``_TiledInfoNCE`` computes it tile by tile with an online
log-sum-exp (Inf-CL, arXiv 2410.17243); forward keeps only the (N,) and (M,) log-sum-exp vectors, backward
rebuilds each tile of ``s`` and of the softmax from them and writes the gradients (positive terms included)
into one (N, d) and one (M, d) buffer. Memory is O((N + M) d + tile^2); compute is one extra tile matmul
per tile over the untiled loss. The single-process symmetric loss gets both directions from one pass (row
and column log-sum-exp of the same tiles).

Precision: on CUDA the tile matmuls run in bf16 with fp32 output (``torch.mm(..., out_dtype=float32)``)
and the log-sum-exp and gradients accumulate in fp32; elsewhere (and for float64 inputs) everything stays
in the input dtype. ``compute_dtype`` overrides the matmul dtype. The temperature may be a learnable
tensor: its gradient is exact, from ``dL/dt = -(1/t) sum_i x_i . dL/dx_i`` (no extra tile work).

Across ranks, ``tiled_gathered_loss`` mirrors ``gathered_contrastive_loss``: the (n, d) embeddings are
gathered with gradient (O(N d), never N x N) and each rank computes its own rows against every column.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class _Pairs:
    """Row i's only positive is column ``offset + i``."""

    offset: int = 0


@dataclass(frozen=True)
class _Identities:
    """Rows and columns with equal ids are positives: ``ix``/``iy`` index each row/column's identity among
    ``k``; ``count_x``/``count_y`` count each identity's rows/columns."""

    ix: torch.Tensor
    iy: torch.Tensor
    count_x: torch.Tensor
    count_y: torch.Tensor

    @staticmethod
    def of(lx: torch.Tensor, ly: torch.Tensor) -> "_Identities":
        ids, inverse = torch.unique(torch.cat([lx, ly]), return_inverse=True)
        ix, iy = inverse[: lx.shape[0]], inverse[lx.shape[0]:]
        return _Identities(ix, iy, torch.bincount(ix, minlength=ids.shape[0]), torch.bincount(iy, minlength=ids.shape[0]))

    def sums(self, v: torch.Tensor, index: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
        """Per-identity sums of the rows of ``v``: (k, d), the only (k, d) buffer alive at a time."""
        return torch.zeros(self.count_x.shape[0], v.shape[1], dtype=acc, device=v.device).index_add_(0, index, v.to(acc))


class _TiledInfoNCE(torch.autograd.Function):
    """(row loss, column loss) of ``s = x y^T / t``: row loss ``mean_i [logsumexp_j s_ij - mean_{j in
    pos(i)} s_ij]``; column loss the same over the columns of ``s`` (only with ``cols``, else 0).

    Forward keeps the (N,) and (M,) log-sum-exp vectors; backward rebuilds each tile of the softmax from
    them and writes the gradients, positive terms included, into one (N, d) and one (M, d) buffer. Saved:
    x, y (references), t, the two vectors."""

    @staticmethod
    def forward(ctx, x, y, t, positives, cols: bool, tile: int, compute_dtype: Optional[torch.dtype]):
        cd, acc = _dtypes(x, compute_dtype)
        inv_t = (1.0 / t.detach()).to(acc).reshape(())
        xc, yc = x.detach().to(cd), y.detach().to(cd)  # cast once per pass: O((N + M) d), never per tile pair
        n, m = x.shape[0], y.shape[0]
        lse_r = torch.full((n,), -torch.inf, dtype=acc, device=x.device)
        lse_c = torch.full((m if cols else 0,), -torch.inf, dtype=acc, device=x.device)
        row_tiles, col_tiles = _tiles(n, tile), _tiles(m, tile)
        for i0, i1 in row_tiles:
            row = lse_r[i0:i1]
            for j0, j1 in col_tiles:
                s = _mm(xc[i0:i1], yc[j0:j1].t(), acc).mul_(inv_t)
                row = torch.logaddexp(row, torch.logsumexp(s, 1))
                if cols:
                    lse_c[j0:j1] = torch.logaddexp(lse_c[j0:j1], torch.logsumexp(s, 0))
            lse_r[i0:i1] = row
        # positive logits in the input precision: sum_i x_i . y_pos(i) (pairs) or x_i . Y_id(i) / count
        if isinstance(positives, _Pairs):
            dots = sum((x[i0:i1].to(acc) * y[positives.offset + i0:positives.offset + i1].to(acc)).sum()
                       for i0, i1 in row_tiles) * inv_t
            pos_r, pos_c = dots / n, dots / m
        else:
            ys = positives.sums(y, positives.iy, acc)
            q = torch.cat([(x[i0:i1].to(acc) * ys[positives.ix[i0:i1]]).sum(1) for i0, i1 in row_tiles]) * inv_t
            del ys
            pos_r = (q / positives.count_y[positives.ix]).sum() / n  # a row without positives: 0/0 = NaN
            pos_c = (q / positives.count_x[positives.ix]).sum() / m
            if cols and ((positives.count_y > 0) & (positives.count_x == 0)).any():
                pos_c = pos_c + torch.nan  # a column without positives, as the untiled loss has it
        ctx.save_for_backward(x, y, t, lse_r, lse_c)
        ctx.positives, ctx.cols, ctx.tile, ctx.compute_dtype = positives, cols, tile, compute_dtype
        row_loss = lse_r.mean() - pos_r
        col_loss = lse_c.mean() - pos_c if cols else torch.zeros((), dtype=acc, device=x.device)
        return row_loss, col_loss

    @staticmethod
    @once_differentiable
    def backward(ctx, g_row, g_col):
        x, y, t, lse_r, lse_c = ctx.saved_tensors
        need_x, need_y, need_t = ctx.needs_input_grad[:3]
        cd, acc = _dtypes(x, ctx.compute_dtype)
        inv_t = (1.0 / t).to(acc).reshape(())
        xc, yc = x.to(cd), y.to(cd)
        n, m = x.shape[0], y.shape[0]
        c_r = g_row.to(acc) / n  # dL/ds_ij = c_r softmax_j(s)_ij + c_c softmax_i(s)_ij - positive terms
        c_c = g_col.to(acc) / m if ctx.cols else None
        need_x = need_x or need_t  # dL/dt comes from dL/dx
        gx = torch.zeros(x.shape, dtype=acc, device=x.device) if need_x else None
        gy = torch.zeros(y.shape, dtype=acc, device=y.device) if need_y else None
        row_tiles, col_tiles = _tiles(n, ctx.tile), _tiles(m, ctx.tile)
        for i0, i1 in row_tiles:
            xi = xc[i0:i1]
            for j0, j1 in col_tiles:
                s = _mm(xi, yc[j0:j1].t(), acc).mul_(inv_t)
                w = (s - lse_r[i0:i1, None]).exp_().mul_(c_r)
                if c_c is not None:
                    w += s.sub_(lse_c[None, j0:j1]).exp_().mul_(c_c)
                w = w.to(cd)
                if gx is not None:
                    gx[i0:i1] += _mm(w, yc[j0:j1], acc)
                if gy is not None:
                    gy[j0:j1] += _mm(w.t(), xi, acc)
        _subtract_positive_grads(ctx.positives, x, y, gx, gy, c_r, c_c, ctx.tile, acc)
        grad_t = None
        for g in (gx, gy):
            if g is not None:
                g.mul_(inv_t)
        if need_t:  # ds/dt = -s/t, so dL/dt = -(1/t) sum_i x_i . dL/dx_i (tile by tile: no (N, d) temporary)
            dot = sum((x[i0:i1].to(acc) * gx[i0:i1]).sum() for i0, i1 in row_tiles)
            grad_t = (-dot * inv_t).reshape(t.shape).to(t.dtype)
        return (gx.to(x.dtype) if ctx.needs_input_grad[0] else None, gy.to(y.dtype) if need_y else None,
                grad_t, None, None, None, None)


def _subtract_positive_grads(positives, x, y, gx, gy, c_r, c_c, tile, acc) -> None:
    """The positive terms' share of dL/dx and dL/dy (before the 1/t factor), in place, tile by tile."""
    if isinstance(positives, _Pairs):
        coef = c_r + (c_c if c_c is not None else 0)
        o = positives.offset
        for i0, i1 in _tiles(x.shape[0], tile):
            if gx is not None:
                gx[i0:i1] -= coef * y[o + i0:o + i1].to(acc)
            if gy is not None:
                gy[o + i0:o + i1] -= coef * x[i0:i1].to(acc)
        return
    count_x, count_y = positives.count_x.to(acc), positives.count_y.to(acc)
    coef = c_r / count_y + (c_c / count_x if c_c is not None else 0)  # per identity
    for g, v, own, other in ((gx, y, positives.ix, positives.iy), (gy, x, positives.iy, positives.ix)):
        if g is None:
            continue
        sums = positives.sums(v, other, acc).mul_(coef[:, None])
        for i0, i1 in _tiles(g.shape[0], tile):
            g[i0:i1] -= sums[own[i0:i1]]
        del sums


def _tiled_losses(x, y, temperature, positives, cols, tile, compute_dtype):
    tile = default_tile(x.device) if tile is None else int(tile)
    if tile < 1:
        raise ValueError(f"tile={tile}: the tile size must be a positive number of rows")
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"embeddings of shapes {tuple(x.shape)} and {tuple(y.shape)}: expected (N, D) and (M, D)")
    return _TiledInfoNCE.apply(x, y, _temperature(temperature, x), positives, cols, tile, compute_dtype)


def _temperature(temperature: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature of shape {tuple(temperature.shape)}: expected one value")
        return temperature
    return torch.tensor(float(temperature), dtype=like.dtype, device=like.device)


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
    and columns (default: ``default_tile(a.device)``), both directions from one pass. Without labels the
    positives are the diagonal."""
    if labels is None:
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"pairs need as many rows in a as in b, got {a.shape[0]} and {b.shape[0]}")
        positives = _Pairs()
    else:
        positives = _Identities.of(labels, labels if labels_b is None else labels_b)
    row, col = _tiled_losses(a, b, temperature, positives, True, tile, compute_dtype)
    return 0.5 * (row + col)


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
    offset: int = 0,
) -> torch.Tensor:
    """``local_rows_loss`` in tiles: this rank's anonymized rows against every original and its originals
    against every anonymized image. Without labels (pairs) the positive of local row i is global row
    ``offset + i`` (``offset`` = rank x rows per rank)."""
    if labels_local is None:
        if offset < 0 or offset + a_local.shape[0] > a_all.shape[0]:
            raise ValueError(f"offset={offset}: local rows {a_local.shape[0]} do not fit in {a_all.shape[0]} global rows")
        positives = _Pairs(offset)
    else:
        positives = _Identities.of(labels_local, labels_all)
    ab, _ = _tiled_losses(a_local, b_all, temperature, positives, False, tile, compute_dtype)
    ba, _ = _tiled_losses(b_local, a_all, temperature, positives, False, tile, compute_dtype)
    return 0.5 * (ab + ba)


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
    import torch.distributed as dist

    labels_all = None if labels is None else gather_no_grad(labels, group)
    offset = dist.get_rank(group) * a.shape[0]
    return tiled_local_rows_loss(a, b, a_all, b_all, temperature, labels, labels_all, tile, compute_dtype, offset)
