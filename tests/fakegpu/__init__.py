"""A fake accelerator for CPU tests of device discipline: the ``fakegpu`` device and a process group that,
like nccl, serves that device only.

- ``load()`` builds (once, cached by torch in ~/.cache/torch_extensions) and loads ``fakegpu.cpp``: a
  PrivateUse1 device, renamed ``fakegpu``, whose tensors live in host memory and compute through ATen's CPU
  fallback. Models, autograd, optimizers and DDP run on it; ``tensor.device.type`` is ``"fakegpu"``.
- ``init_group(rank, world, port)``: ``torch.distributed`` with backend ``"fakegpu:fakegpuccl"``: its only
  backend is registered for ``fakegpu``, so a collective on a CPU tensor raises torch's own
  "No backend type associated with device type cpu", exactly what nccl does to a CPU tensor on a GPU
  cluster. The backend moves fakegpu tensors through a real gloo group on the same store and counts the
  collectives it served (``SERVED``).

Not covered: torch.save of fakegpu tensors (storage copies across devices are not implemented here).
"""

from __future__ import annotations

import collections
import types
from datetime import timedelta
from pathlib import Path

import torch

DEVICE = "fakegpu"
BACKEND = "fakegpuccl"
SERVED: collections.Counter = collections.Counter()
_loaded = False


def build() -> None:
    """Compile and load the extension (about 25 s the first time on 2 cores; then cached)."""
    from torch.utils.cpp_extension import load as load_extension

    load_extension(name="anonrisk_fakegpu", sources=[str(Path(__file__).with_name("fakegpu.cpp"))],
                   is_python_module=False, extra_cflags=["-O1"], verbose=False)


def load() -> None:
    global _loaded
    if _loaded:
        return
    build()
    torch.utils.rename_privateuse1_backend(DEVICE)
    mod = types.ModuleType(DEVICE)  # what torch asks of a device module (torch.<device>.*)
    mod.is_available = lambda: True
    mod.is_initialized = lambda: True
    mod.device_count = lambda: 1
    mod.current_device = lambda: 0
    mod._is_in_bad_fork = lambda: False
    mod.manual_seed_all = lambda seed: None  # random ops run on the CPU generator (CPU fallback)
    mod.get_rng_state = lambda device=None: torch.empty(0, dtype=torch.uint8)
    mod.set_rng_state = lambda state, device=None: None
    torch._register_device_module(DEVICE, mod)
    torch.distributed.Backend.register_backend(BACKEND, _Backend, devices=[DEVICE])
    _loaded = True


def init_group(rank: int, world_size: int, port: int) -> None:
    load()
    torch.distributed.init_process_group(f"{DEVICE}:{BACKEND}", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size)


def _done(result) -> "torch.distributed.Work":
    import torch.distributed as dist

    class _Work(dist._Work):
        def __init__(self, fut):
            super().__init__()
            self.fut = fut

        def wait(self, timeout=None):
            self.fut.wait()
            return True

        def get_future(self):
            return self.fut

    fut = torch.futures.Future()
    fut.set_result(result)
    return _Work(fut)


def _check(op: str, tensors) -> None:
    for t in tensors:
        if t.device.type != DEVICE:  # torch already refuses CPU tensors; this catches any other device too
            raise RuntimeError(f"No backend type associated with device type {t.device.type} ({op})")
    SERVED[op] += 1


class _Backend(torch._C._distributed_c10d.Backend):
    """Serves fakegpu tensors by copying them through a real gloo group (host memory either way)."""

    def __init__(self, store, rank: int, size: int, timeout: timedelta):
        import torch.distributed as dist

        super().__init__(rank, size)
        self.gloo = dist.ProcessGroupGloo(dist.PrefixStore("fakegpu-gloo", store), rank, size, timeout)

    def getBackendName(self) -> str:
        return BACKEND

    def _in_place(self, tensors, collective):
        """Run a gloo collective on host copies of ``tensors``, then write the result back."""
        host = [t.cpu() for t in tensors]
        collective(host).wait()
        for t, h in zip(tensors, host):
            t.copy_(h)
        return _done(tensors)

    def allreduce(self, tensors, opts):
        _check("allreduce", tensors)
        return self._in_place(tensors, lambda host: self.gloo.allreduce(host, opts))

    def allgather(self, outputs, inputs, opts):
        _check("allgather", inputs + [t for out in outputs for t in out])
        host_out = [[t.cpu() for t in out] for out in outputs]
        self.gloo.allgather(host_out, [t.cpu() for t in inputs], opts).wait()
        for out, host in zip(outputs, host_out):
            for t, h in zip(out, host):
                t.copy_(h)
        return _done(outputs)

    def all_gather_single(self, output, input, opts):  # all_gather_into_tensor (_allgather_base before torch 2.14)
        _check("allgather_into_tensor", [output, input])
        parts = [torch.empty_like(input.cpu()) for _ in range(self.size())]
        self.gloo.allgather([parts], [input.cpu()]).wait()
        output.copy_(torch.cat(parts))
        return _done([output])

    def reduce_scatter_single(self, output, input, opts):  # reduce_scatter_tensor, sum
        _check("reduce_scatter_tensor", [output, input])
        host = input.cpu()
        self.gloo.allreduce([host]).wait()
        output.copy_(host.chunk(self.size())[self.rank()])
        return _done([output])

    _allgather_base, _reduce_scatter_base = all_gather_single, reduce_scatter_single

    def broadcast(self, tensors, opts):
        _check("broadcast", tensors)
        return self._in_place(tensors, lambda host: self.gloo.broadcast(host, opts))

    def barrier(self, opts):
        SERVED["barrier"] += 1
        self.gloo.barrier(opts).wait()
        return _done([])
