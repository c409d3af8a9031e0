"""Tiled contrastive losses: the losses of ``losses.py`` without ever holding an N x M similarity matrix.

Both objectives are ``mean_i [logsumexp_j s_ij - mean_{j in pos(i)} s_ij]`` per direction, with
``s = x y^T / t``. The positive term is linear in ``s``, so it needs no matrix: for pairs it is a row-wise
dot product, for identities ``x_i . Y_id(i) / count`` with ``Y_l`` the sum of identity l's columns. Only the
log-sum-exp couples every row with every column: ``_TiledInfoNCE`` computes it tile by tile with an online
log-sum-exp (Inf-CL, arXiv 2410.17243); forward keeps only the (N,) and (M,) log-sum-exp vectors, backward
rebuilds each tile of ``s`` and of the softmax from them and writes the gradients (positive terms included)
straight into the inputs' gradient buffers. The inputs may be lists of row blocks (GradCache's chunk
embeddings), read tile by tile and never concatenated, so under GradCache the loss adds only the gradient
buffers to the cached embeddings. Memory is O((N + M) d + tile^2); compute is one extra tile matmul
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

import bisect
from dataclasses import dataclass
from typing import Optional, Sequence, Union

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


class _Blocks:
    """Row blocks (GradCache's chunk embeddings, or one tensor) read as one (N, d) matrix without
    concatenating them: ``rows(i0, i1)`` is a view inside one block and a tile-sized copy across blocks."""

    def __init__(self, blocks: Sequence[torch.Tensor]):
        self.blocks = list(blocks)
        self.starts = [0]
        for b in self.blocks:
            self.starts.append(self.starts[-1] + b.shape[0])
        self.n = self.starts[-1]

    def cast(self, dtype: torch.dtype) -> "_Blocks":
        return _Blocks([b.to(dtype) for b in self.blocks])  # no copy when already in dtype

    def _parts(self, i0: int, i1: int):
        """(block, first row in it, end row in it, offset in [i0, i1)) for each block meeting [i0, i1)."""
        k = bisect.bisect_right(self.starts, i0) - 1
        while k < len(self.blocks) and self.starts[k] < i1:
            lo, hi = max(i0, self.starts[k]), min(i1, self.starts[k + 1])
            if lo < hi:
                yield k, lo - self.starts[k], hi - self.starts[k], lo - i0
            k += 1

    def rows(self, i0: int, i1: int) -> torch.Tensor:
        parts = [self.blocks[k][r0:r1] for k, r0, r1, _ in self._parts(i0, i1)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def add_(self, grads: list, i0: int, i1: int, value: torch.Tensor) -> None:
        """grads (one buffer per block)[rows i0:i1] += value."""
        for k, r0, r1, o in self._parts(i0, i1):
            grads[k][r0:r1] += value[o:o + r1 - r0]


@dataclass(frozen=True)
class _Pairs:
    """Row i's only positive is column ``offset + i``."""

    offset: int = 0


@dataclass(frozen=True)
class _Identities:
    """Rows and columns with equal ids are positives: ``ix``/``iy`` index each row/column's identity;
    ``count_x``/``count_y`` count each identity's rows/columns."""

    ix: torch.Tensor
    iy: torch.Tensor
    count_x: torch.Tensor
    count_y: torch.Tensor

    @staticmethod
    def of(lx: torch.Tensor, ly: torch.Tensor) -> "_Identities":
        ids, inverse = torch.unique(torch.cat([lx, ly]), return_inverse=True)
        ix, iy = inverse[: lx.shape[0]], inverse[lx.shape[0]:]
        return _Identities(ix, iy, torch.bincount(ix, minlength=ids.shape[0]), torch.bincount(iy, minlength=ids.shape[0]))

    def sums(self, v: _Blocks, index: torch.Tensor, d: int, tile: int, acc: torch.dtype, device) -> torch.Tensor:
        """Per-identity sums of the rows of ``v``: (k, d), the only (k, d) buffer alive at a time."""
        out = torch.zeros(self.count_x.shape[0], d, dtype=acc, device=device)
        for i0, i1 in _tiles(v.n, tile):
            out.index_add_(0, index[i0:i1], v.rows(i0, i1).to(acc))
        return out


class _TiledInfoNCE(torch.autograd.Function):
    """(row loss, column loss) of ``s = x y^T / t``: row loss ``mean_i [logsumexp_j s_ij - mean_{j in
    pos(i)} s_ij]``; column loss the same over the columns of ``s`` (only with ``cols``, else 0). ``x`` and
    ``y`` arrive as row blocks (``n_x`` blocks of x, then y's).

    Forward keeps the (N,) and (M,) log-sum-exp vectors; backward rebuilds each tile of the softmax from
    them and writes the gradients, positive terms included, into one buffer per block (which become the
    blocks' gradients as they are: no copy). Saved: the blocks (references), t, the two vectors."""

    @staticmethod
    def forward(ctx, t, positives, cols: bool, tile: int, compute_dtype: Optional[torch.dtype], n_x: int, *blocks):
        x, y = _Blocks(blocks[:n_x]), _Blocks(blocks[n_x:])
        cd, acc = _dtypes(blocks[0], compute_dtype)
        device = blocks[0].device
        inv_t = (1.0 / t.detach()).to(acc).reshape(())
        xc, yc = x.cast(cd), y.cast(cd)  # cast once per pass: O((N + M) d), never per tile pair
        n, m = x.n, y.n
        lse_r = torch.full((n,), -torch.inf, dtype=acc, device=device)
        lse_c = torch.full((m if cols else 0,), -torch.inf, dtype=acc, device=device)
        row_tiles, col_tiles = _tiles(n, tile), _tiles(m, tile)
        for i0, i1 in row_tiles:
            xi, row = xc.rows(i0, i1), lse_r[i0:i1]
            for j0, j1 in col_tiles:
                s = _mm(xi, yc.rows(j0, j1).t(), acc).mul_(inv_t)
                row = torch.logaddexp(row, torch.logsumexp(s, 1))
                if cols:
                    lse_c[j0:j1] = torch.logaddexp(lse_c[j0:j1], torch.logsumexp(s, 0))
            lse_r[i0:i1] = row
        # positive logits in the input precision: x_i . y_pos(i) (pairs) or x_i . Y_id(i) / count
        if isinstance(positives, _Pairs):
            o = positives.offset
            dots = sum((x.rows(i0, i1).to(acc) * y.rows(o + i0, o + i1).to(acc)).sum() for i0, i1 in row_tiles) * inv_t
            pos_r, pos_c = dots / n, dots / m
        else:
            ys = positives.sums(y, positives.iy, blocks[0].shape[1], tile, acc, device)
            q = torch.cat([(x.rows(i0, i1).to(acc) * ys[positives.ix[i0:i1]]).sum(1) for i0, i1 in row_tiles]) * inv_t
            del ys
            pos_r = (q / positives.count_y[positives.ix]).sum() / n  # a row without positives: 0/0 = NaN
            pos_c = (q / positives.count_x[positives.ix]).sum() / m
            if cols and ((positives.count_y > 0) & (positives.count_x == 0)).any():
                pos_c = pos_c + torch.nan  # a column without positives, as the untiled loss has it
        ctx.save_for_backward(t, lse_r, lse_c, *blocks)
        ctx.positives, ctx.cols, ctx.tile, ctx.compute_dtype, ctx.n_x = positives, cols, tile, compute_dtype, n_x
        row_loss = lse_r.mean() - pos_r
        col_loss = lse_c.mean() - pos_c if cols else torch.zeros((), dtype=acc, device=device)
        return row_loss, col_loss

    @staticmethod
    @once_differentiable
    def backward(ctx, g_row, g_col):
        t, lse_r, lse_c, *blocks = ctx.saved_tensors
        n_x, tile = ctx.n_x, ctx.tile
        x, y = _Blocks(blocks[:n_x]), _Blocks(blocks[n_x:])
        need = ctx.needs_input_grad[6:]
        need_t = ctx.needs_input_grad[0]
        need_x, need_y = need_t or any(need[:n_x]), any(need[n_x:])  # dL/dt comes from dL/dx
        cd, acc = _dtypes(blocks[0], ctx.compute_dtype)
        inv_t = (1.0 / t).to(acc).reshape(())
        xc, yc = x.cast(cd), y.cast(cd)
        n, m, d = x.n, y.n, blocks[0].shape[1]
        c_r = g_row.to(acc) / n  # dL/ds_ij = c_r softmax_j(s)_ij + c_c softmax_i(s)_ij - positive terms
        c_c = g_col.to(acc) / m if ctx.cols else None
        gx = [torch.zeros(b.shape, dtype=acc, device=b.device) for b in x.blocks] if need_x else None
        gy = [torch.zeros(b.shape, dtype=acc, device=b.device) for b in y.blocks] if need_y else None
        row_tiles, col_tiles = _tiles(n, tile), _tiles(m, tile)
        for i0, i1 in row_tiles:
            xi = xc.rows(i0, i1)
            gxi = torch.zeros(i1 - i0, d, dtype=acc, device=xi.device) if need_x else None
            for j0, j1 in col_tiles:
                yj = yc.rows(j0, j1)
                s = _mm(xi, yj.t(), acc).mul_(inv_t)
                w = (s - lse_r[i0:i1, None]).exp_().mul_(c_r)
                if c_c is not None:
                    w += s.sub_(lse_c[None, j0:j1]).exp_().mul_(c_c)
                w = w.to(cd)
                if gxi is not None:
                    gxi += _mm(w, yj, acc)
                if gy is not None:
                    y.add_(gy, j0, j1, _mm(w.t(), xi, acc))
            if gxi is not None:
                x.add_(gx, i0, i1, gxi)
        _subtract_positive_grads(ctx.positives, x, y, gx, gy, c_r, c_c, tile, acc)
        for g in (gx or []) + (gy or []):
            g.mul_(inv_t)
        grad_t = None
        if need_t:  # ds/dt = -s/t, so dL/dt = -(1/t) sum_i x_i . dL/dx_i (tile by tile: no (N, d) temporary)
            gxb = _Blocks(gx)
            dot = sum((x.rows(i0, i1).to(acc) * gxb.rows(i0, i1)).sum() for i0, i1 in row_tiles)
            grad_t = (-dot * inv_t).reshape(t.shape).to(t.dtype)
        grads = [g.to(b.dtype) if ok else None for g, b, ok in zip((gx or [None] * n_x) + (gy or [None] * len(y.blocks)),
                                                                    blocks, need)]
        return (grad_t, None, None, None, None, None, *grads)


def _subtract_positive_grads(positives, x: _Blocks, y: _Blocks, gx, gy, c_r, c_c, tile: int, acc) -> None:
    """The positive terms' share of dL/dx and dL/dy (before the 1/t factor), in place, tile by tile."""
    if isinstance(positives, _Pairs):
        coef, o = c_r + (c_c if c_c is not None else 0), positives.offset
        for i0, i1 in _tiles(x.n, tile):
            if gx is not None:
                x.add_(gx, i0, i1, -coef * y.rows(o + i0, o + i1).to(acc))
            if gy is not None:
                y.add_(gy, o + i0, o + i1, -coef * x.rows(i0, i1).to(acc))
        return
    count_x, count_y = positives.count_x.to(acc), positives.count_y.to(acc)
    coef = c_r / count_y + (c_c / count_x if c_c is not None else 0)  # per identity
    d = x.blocks[0].shape[1]
    for g, own, v, other, v_index in ((gx, x, y, positives.ix, positives.iy), (gy, y, x, positives.iy, positives.ix)):
        if g is None:
            continue
        sums = positives.sums(v, v_index, d, tile, acc, v.blocks[0].device).mul_(coef[:, None])
        for i0, i1 in _tiles(own.n, tile):
            own.add_(g, i0, i1, -sums[other[i0:i1]])
        del sums


Embeddings = Union[torch.Tensor, Sequence[torch.Tensor]]


def _as_blocks(v: Embeddings, name: str) -> list[torch.Tensor]:
    blocks = [v] if isinstance(v, torch.Tensor) else list(v)
    if not blocks or any(b.ndim != 2 or b.shape[1] != blocks[0].shape[1] for b in blocks):
        shapes = [tuple(b.shape) for b in blocks]
        raise ValueError(f"{name}: expected (N, D) embeddings or row blocks of equal D, got shapes {shapes}")
    return blocks


def _rows(v: Embeddings) -> int:
    return v.shape[0] if isinstance(v, torch.Tensor) else sum(b.shape[0] for b in v)


def _tiled_losses(x: Embeddings, y: Embeddings, temperature, positives, cols, tile, compute_dtype):
    tile = default_tile(_as_blocks(x, "x")[0].device) if tile is None else int(tile)
    if tile < 1:
        raise ValueError(f"tile={tile}: the tile size must be a positive number of rows")
    xb, yb = _as_blocks(x, "a"), _as_blocks(y, "b")
    if xb[0].shape[1] != yb[0].shape[1]:
        raise ValueError(f"embeddings of dimension {xb[0].shape[1]} and {yb[0].shape[1]}: they must agree")
    t = _temperature(temperature, xb[0])
    return _TiledInfoNCE.apply(t, positives, cols, tile, compute_dtype, len(xb), *xb, *yb)


def _temperature(temperature: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature of shape {tuple(temperature.shape)}: expected one value")
        return temperature
    return torch.tensor(float(temperature), dtype=like.dtype, device=like.device)


def tiled_contrastive_loss(
    a: Embeddings,
    b: Embeddings,
    temperature: float | torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    labels_b: Optional[torch.Tensor] = None,
    tile: Optional[int] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``contrastive_loss`` (same arguments, same value and gradients) computed in tiles of ``tile`` rows
    and columns (default: ``default_tile``), both directions from one pass. ``a`` and ``b`` may also be
    lists of row blocks (GradCache's chunk embeddings), read in order and never concatenated. Without
    labels the positives are the diagonal."""
    if labels is None:
        if _rows(a) != _rows(b):
            raise ValueError(f"pairs need as many rows in a as in b, got {_rows(a)} and {_rows(b)}")
        positives = _Pairs()
    else:
        positives = _Identities.of(labels, labels if labels_b is None else labels_b)
    row, col = _tiled_losses(a, b, temperature, positives, True, tile, compute_dtype)
    return 0.5 * (row + col)


def tiled_local_rows_loss(
    a_local: Embeddings,
    b_local: Embeddings,
    a_all: Embeddings,
    b_all: Embeddings,
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
        if offset < 0 or offset + _rows(a_local) > _rows(a_all):
            raise ValueError(f"offset={offset}: {_rows(a_local)} local rows do not fit in {_rows(a_all)} global rows")
        positives = _Pairs(offset)
    else:
        positives = _Identities.of(labels_local, labels_all)
    ab, _ = _tiled_losses(a_local, b_all, temperature, positives, False, tile, compute_dtype)
    ba, _ = _tiled_losses(b_local, a_all, temperature, positives, False, tile, compute_dtype)
    return 0.5 * (ab + ba)


def tiled_gathered_loss(
    a: Embeddings,
    b: Embeddings,
    temperature: float | torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    group=None,
    tile: Optional[int] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``gathered_contrastive_loss`` in tiles: this rank's rows of the global-batch loss. The mean over
    ranks is the single-process ``contrastive_loss`` of the global batch, and so is its gradient once data
    parallelism averages it. One rank (or no process group): ``tiled_contrastive_loss``, which takes row
    blocks as they are; with several ranks they are concatenated for the all_gather."""
    import torch.distributed as dist

    world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    if world == 1:  # both directions from one pass over the tiles
        return tiled_contrastive_loss(a, b, temperature, labels, tile=tile, compute_dtype=compute_dtype)
    a, b = (v if isinstance(v, torch.Tensor) else torch.cat(list(v)) for v in (a, b))
    a_all, b_all = gather_with_grad(a, group), gather_with_grad(b, group)
    labels_all = None if labels is None else gather_no_grad(labels, group)
    offset = dist.get_rank(group) * a.shape[0]
    return tiled_local_rows_loss(a, b, a_all, b_all, temperature, labels, labels_all, tile, compute_dtype, offset)
