"""GradCache: a contrastive batch far larger than activation memory allows, with exact gradients.

The loss couples every image of the batch only through the embeddings, so the step splits in three:
1. embed each chunk without recording a graph (RNG state saved per chunk),
2. compute the loss on those embeddings (detached leaves) and its gradient with respect to them, once,
3. re-run each chunk with its RNG state restored and back-propagate the cached embedding gradient
   (``(embedding * cached_grad).sum()``), accumulating parameter gradients chunk by chunk.
Memory is one chunk's activations plus the (N, D) embeddings; compute is one extra forward pass.
Gradient sync across ranks happens only on the last chunk's backward (``chunk_context(last)`` wraps each\nchunk's forward and backward: DDP's ``no_sync``, DeepSpeed's accumulation boundary).

Exact for chunk-invariant models (LayerNorm, GroupNorm: timm's ConvNeXt). BatchNorm in training mode
normalises per chunk, not per batch: freeze it (``attack.freeze_bn``) to keep chunking exact.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator, Sequence, Union

import torch

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # x -> (embeddings, temperature)
# a chunk: its input tensor, or a function making it (so a huge batch never exists as one float tensor)
Chunk = Union[torch.Tensor, Callable[[], torch.Tensor]]
LossFn = Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]  # (chunk embeddings, temperature) -> loss
Backward = Callable[[torch.Tensor], None]  # scalar -> None (accumulates parameter gradients)
# wraps the forward + backward of one chunk; True for the step's last chunk (the one whose backward syncs)
ChunkContext = Callable[[bool], ContextManager]


def _no_context(last: bool) -> ContextManager:
    return contextlib.nullcontext()


class RandState:
    """The CPU (and current CUDA device's) RNG state at construction; ``restored()`` replays it without
    disturbing the RNG outside the block."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def full_batch_step(forward: Forward, x: Chunk, loss_fn: LossFn, backward: Backward,
                    chunk_context: ChunkContext = _no_context) -> torch.Tensor:
    """The reference: one forward over everything, one backward. Returns the loss (detached)."""
    with chunk_context(True):
        emb, t = forward(_input(x))
        loss = loss_fn([emb.float()], t)
        backward(loss)
    return loss.detach()


def _input(chunk: Chunk) -> torch.Tensor:
    return chunk() if callable(chunk) else chunk


def grad_cache_step(forward: Forward, chunks: Sequence[Chunk], loss_fn: LossFn, backward: Backward,
                    chunk_context: ChunkContext = _no_context) -> torch.Tensor:
    """GradCache over ``chunks`` (see the module doc). Parameter gradients equal ``full_batch_step``'s on
    ``torch.cat(chunks)`` for chunk-invariant models. A chunk given as a function is made twice (embedding
    pass and re-run) and must give the same tensor both times. Returns the loss (detached)."""
    states, cached = [], []
    temperature = None
    with torch.no_grad():
        for c in chunks:
            x = _input(c)
            states.append(RandState(x.device))
            emb, t = forward(x)
            cached.append(emb.float())
            temperature = t
    leaves = [e.detach().requires_grad_() for e in cached]
    t_leaf = temperature.detach().float().requires_grad_()  # used only if the temperature is learnable
    loss = loss_fn(leaves, t_leaf)
    loss.backward()  # gradients w.r.t. the embeddings (and temperature) only: no parameter is in this graph
    t_grad = t_leaf.grad
    for i, (c, state, leaf) in enumerate(zip(chunks, states, leaves)):
        last = i == len(chunks) - 1
        x = _input(c)
        with chunk_context(last):
            with state.restored():
                emb, t = forward(x)
            surrogate = (emb.float() * leaf.grad).sum()
            if last and t_grad is not None and t.requires_grad:
                surrogate = surrogate + (t.float() * t_grad).sum()  # the temperature's gradient, once
            backward(surrogate)
    return loss.detach()


def freeze_batchnorm(module: torch.nn.Module) -> int:
    """Put every BatchNorm layer in eval mode (running statistics, no update; affine weights still train).
    Call after every ``module.train()``. Returns how many layers it froze."""
    n = 0
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
            n += 1
    return n


def has_batchnorm(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())
