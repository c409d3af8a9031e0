"""What produced a result: the program (version, git commit, uncommitted changes), its libraries, the host,
and how each stage actually ran (devices, precision, attention backend). ``metrics.json`` carries it as its
``environment`` block, so a committed number says how it was made."""

from __future__ import annotations

import functools
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

#: the libraries whose versions decide the numbers (read from installed metadata: nothing is imported)
PACKAGES = ("torch", "torchvision", "numpy", "diffusers", "transformers", "accelerate", "timm", "deepspeed",
            "ray", "mlflow", "submitit", "scikit-image", "pydantic")
#: what counts as the program when deciding whether the checkout is dirty (results/ and runs/ do not)
PROGRAM_PATHS = ("anonrisk", "configs", "pyproject.toml", "requirements")


def package_versions() -> dict[str, Optional[str]]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    torch = sys.modules.get("torch")
    if torch is not None:  # the build tag (+cu130, +cpu) and the CUDA it was built for decide kernels too
        out["torch"], out["torch_cuda"] = torch.__version__, torch.version.cuda
    return out


@functools.lru_cache(maxsize=None)
def git_state(root: Optional[str] = None) -> dict[str, Any]:
    """The commit of the checkout anonrisk runs from and whether its program files differ from it; nulls
    for an installed (non-checkout) package or without git."""
    root = root or str(Path(__file__).resolve().parents[1])

    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no", "--", *PROGRAM_PATHS)
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def host() -> dict[str, Any]:
    from anonrisk.devices import cpu_model

    out: dict[str, Any] = {"platform": platform.platform(), "cpu": cpu_model(), "cpus": _cpu_count()}
    torch = sys.modules.get("torch")  # only if a stage already imported it: the block never costs an import
    if torch is not None and torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out


def _cpu_count() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def made_by() -> dict[str, Any]:
    """The program that made a stage (recorded in its DONE)."""
    from anonrisk import __version__

    return {"anonrisk": __version__, **git_state()}


def environment(stages: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The ``environment`` block: ``stages`` maps each anonymizer to how its stages ran (see
    ``report.stage_runtime``)."""
    from anonrisk import __version__

    return {
        "anonrisk": __version__,
        "git": git_state(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "host": host(),
        "stages": stages or {},
    }
