"""Device selection shared by every stage."""

from __future__ import annotations


def resolve_device(name: str = "auto") -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        from anonrisk.errors import ConfigError

        raise ConfigError(f"device {name!r} requested but no CUDA device is available; use device=cpu or auto")
    return name


def cpu_model() -> str:
    """The CPU's marketing name (Linux), else the platform's processor string."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    """What a device really is, for the record: ``cuda:0 (NVIDIA H200)``, ``cpu (AMD EPYC)``."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if dev.type == "cpu":
        return f"cpu ({cpu_model()})"
    return str(dev)
