"""``anonrisk weights PRESET|GRID``: every weights file a real run needs, where it comes from, where it goes.

Each model, VAE, ControlNet, annotator, detector and recognizer the presets name becomes one ``Need``:
the param that names it, its source (a Hugging Face repo, with the files to take from it, or a pip
package), its place under a weights root, and whether it is there. Values the presets write as
``weights/<rel>`` live at ``<root>/<rel>``; hub ids live at ``<root>/<hub id>``; with ``ANONRISK_WEIGHTS``
set, the anonymizers read both from that root (``anonrisk.weights.localize``). ``fetch`` downloads the
missing ones with ``huggingface_hub.snapshot_download`` (``HF_ENDPOINT`` picks the server: the Hub, a
mirror); ``random:*`` and ``random`` entries need nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

from anonrisk.errors import ConfigError
from anonrisk.weights import HUB_ID, WEIGHTS_PREFIX

ANNOTATORS = "lllyasviel/Annotators"

#: ``weights/<rel>`` -> (hub repo, files to take from it: None = the whole repo), or why there is no source
SOURCES: dict[str, Union[str, tuple[str, Optional[tuple[str, ...]]]]] = {
    "models/realistic-vision-v51": ("SG161222/Realistic_Vision_V5.1_noVAE", None),
    "models/sd-vae-ft-mse": ("stabilityai/sd-vae-ft-mse", ("config.json", "diffusion_pytorch_model.safetensors")),
    "annotators/dpt_hybrid-midas-501f0c75.pt": (ANNOTATORS, ("dpt_hybrid-midas-501f0c75.pt",)),
    "annotators/scannet.pt": (ANNOTATORS, ("scannet.pt",)),
    "annotators/body_pose_model.pth": (ANNOTATORS, ("body_pose_model.pth",)),
    "annotators/ControlNetHED.pth": (ANNOTATORS, ("ControlNetHED.pth",)),
    "annotators/table5_pidinet.pth": (ANNOTATORS, ("table5_pidinet.pth",)),
    "annotators": (ANNOTATORS, ("sk_model.pth", "sk_model2.pth")),  # the lineart folder
    "annotators/upernet-convnext-small": ("openmmlab/upernet-convnext-small", ("config.json", "preprocessor_config.json", "*.safetensors")),
    "annotators/depth-anything-large-hf": ("LiheYoung/depth-anything-large-hf", ("config.json", "preprocessor_config.json", "*.safetensors")),
    "annotators/ade20k_palette.json": "none (write it from the ADE20K class colours: docs/diffusion.md)",
    "controlnets/identity-sd15": "none (unreleased: train one, configs/anonymizers/camouflage-base.yaml)",
    "ip-adapter": ("h94/IP-Adapter", ("models/ip-adapter_sd15.safetensors", "models/image_encoder/*")),
    "adapters/camouflage-light-t2i": "none (the paper's fine-tuned T2I-Adapter is unreleased: train one, in_channels 45)",
}
for _cn in ("control_v11f1p_sd15_depth", "control_v11p_sd15_normalbae", "control_v11p_sd15_seg", "control_v11p_sd15_openpose",
            "control_v11p_sd15_lineart", "control_v11p_sd15_softedge", "control_v11p_sd15_canny"):
    SOURCES[f"controlnets/{_cn}"] = (f"lllyasviel/{_cn}", ("config.json", "diffusion_pytorch_model.safetensors"))
#: what a diffusers model folder needs from its repo (not the single-file checkpoints beside it)
PIPELINE_FILES = ("model_index.json", "*/config.json", "*/*.json", "*/*.txt", "unet/*.safetensors", "vae/*.safetensors",
                  "text_encoder/*.safetensors")
CONTROLNET_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


@dataclass
class Need:
    what: str  # "anonymizer instance-aug: params.model"
    value: str  # as the preset writes it
    source: str  # "hf:<repo>" / "pip:<package>" / "none (...)"
    files: Optional[tuple[str, ...]]  # allow_patterns for snapshot_download; None = the whole repo
    local: Path  # where it goes under the root

    @property
    def single_file(self) -> bool:
        """A file taken out of a repo of many (``<root>/annotators/x.pth``): downloaded into its folder."""
        return bool(self.files) and self.local.name in self.files

    def present(self) -> bool:
        if self.single_file:
            return self.local.is_file()
        if self.files and not any("*" in f for f in self.files):
            return all((self.local / f).is_file() for f in self.files)
        return self.local.is_dir() and any(self.local.iterdir()) if self.source.startswith("hf:") else self.local.exists()


def root_dir(root: Optional[str]) -> Path:
    return Path(root or os.environ.get("ANONRISK_WEIGHTS") or "weights").expanduser()


def _entries(params: dict) -> Iterable[tuple[str, str, str]]:
    """(param key, value, role) of every weights reference in an anonymizer's params."""
    if params.get("model"):
        yield "params.model", params["model"], "pipeline"
    if params.get("vae"):
        yield "params.vae", params["vae"], "model"
    cns = params.get("controlnets") or []
    for i, cn in enumerate([cns] if isinstance(cns, str) else cns):
        yield f"params.controlnets[{i}]", cn, "controlnet"
    for key in ("ip_adapter", "t2i_adapter"):
        if params.get(key):
            yield f"params.{key}", params[key], "model"
    if params.get("identity_controlnet"):
        yield "params.identity_controlnet", params["identity_controlnet"], "controlnet"
    for name, path in (params.get("annotator_weights") or {}).items():
        yield f"params.annotator_weights.{name}", path, "file"
    for i, cond in enumerate(params.get("conditions") or []):
        palette = isinstance(cond, dict) and (cond.get("options") or {}).get("palette")
        if palette:
            yield f"params.conditions[{i}].options.palette", palette, "file"
    mask = params.get("mask") or {}
    if mask.get("detector_weights"):
        yield "params.mask.detector_weights", mask["detector_weights"], "file"
    if params.get("redetector_weights"):
        yield "params.redetector_weights", params["redetector_weights"], "file"


def anonymizer_needs(name: str, root: Path, dirs: Optional[list[Path]] = None) -> list[Need]:
    from anonrisk.config.loader import preset_dirs, resolve_anonymizer

    spec = resolve_anonymizer(name, dirs or preset_dirs(None), 0)
    out = []
    for key, value, role in _entries(spec.params):
        if not isinstance(value, str) or value == "random" or value.startswith("random:"):
            continue
        what = f"anonymizer {name}: {key}"
        if value.startswith(WEIGHTS_PREFIX):
            rel = value[len(WEIGHTS_PREFIX):].rstrip("/")
            src = SOURCES.get(rel, ...)
            if src is ...:
                out.append(Need(what, value, "none (unknown to anonrisk weights: fetch it yourself)", None, root / rel))
            elif isinstance(src, str):
                out.append(Need(what, value, src, None, root / rel))
            else:
                out.append(Need(what, value, f"hf:{src[0]}", src[1] or (PIPELINE_FILES if role == "pipeline" else None), root / rel))
        elif HUB_ID.match(value) and not Path(value).exists():
            files = PIPELINE_FILES if role == "pipeline" else CONTROLNET_FILES if role == "controlnet" else None
            out.append(Need(what, value, f"hf:{value}", files, root / value))
        else:  # a local path outside the weights root: the user's own
            out.append(Need(what, value, "local (as given)", None, Path(value).expanduser()))
    return out


def recognizer_needs() -> list[Need]:
    """dlib's recognizer files: shipped by the face-recognition-models pip package."""
    from anonrisk.evaluate.recognizers import DlibRecognizer, face_recognition_models_dir

    d = face_recognition_models_dir() or Path("<site-packages>/face_recognition_models/models")
    return [Need("attack recognizer (dlib)", f, "pip:face-recognition-models", None, d / f) for f in DlibRecognizer.FILES]


def needs(target: str, root: Optional[str] = None) -> list[Need]:
    """Everything ``target`` (an anonymizer preset name, or a grid file / grid name) needs."""
    r = root_dir(root)
    looks_like_grid = target.endswith((".yaml", ".yml")) or Path(target).is_file()
    if not looks_like_grid:
        from anonrisk.config.loader import preset_names

        if target not in preset_names():
            from anonrisk.launch.grid import REPO_CONFIGS

            if not (REPO_CONFIGS / "grids" / f"{target}.yaml").exists():
                raise ConfigError(f"anonrisk weights: {target!r} is neither an anonymizer preset nor a grid")
            looks_like_grid = True
    if not looks_like_grid:
        return anonymizer_needs(target, r)
    from anonrisk.config.loader import preset_dirs
    from anonrisk.launch.grid import load_grid

    spec, path = load_grid(target)
    names: list[str] = []
    axis = spec.axes.get("anonymizer", [])
    for entry in (list(axis) if isinstance(axis, (list, dict)) else []) + list(spec.fixed.get("anonymizers", []) or []):
        if isinstance(entry, str):
            names.append(entry)
    out = []
    for n in dict.fromkeys(names):
        out += anonymizer_needs(n, r, preset_dirs(path))
    return out + recognizer_needs()


def table(items: list[Need]) -> str:
    """One line per need: present, what, source, local place, the files taken from the repo."""
    rows = [("present", "what", "source", "local", "files")]
    rows += [("yes" if n.present() else "no", n.what, n.source, str(n.local), ", ".join(n.files) if n.files else "all")
             for n in items]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    missing = sum(not n.present() for n in items)
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    return "\n".join(lines + [f"{len(items)} needed, {missing} missing"])


def fetch(items: list[Need], dest: str) -> list[str]:
    """Download every ``hf:`` entry of ``items`` (made by ``needs(..., root=dest)``) to its place under
    ``dest``; returns the lines to print: what happened and the setting that points the presets at ``dest``."""
    from huggingface_hub import snapshot_download

    root = Path(dest).expanduser().resolve()
    lines, failed = [], []
    done: set = set()
    for n in items:
        if not n.source.startswith("hf:"):
            if not n.present():
                lines.append(f"skipped {n.what}: {n.source}")
            continue
        repo, target = n.source[3:], (n.local.parent if n.single_file else n.local)
        if (repo, str(target), n.files) in done:
            continue
        done.add((repo, str(target), n.files))
        try:
            snapshot_download(repo, local_dir=str(target), allow_patterns=list(n.files) if n.files else None)
        except Exception as exc:  # network refused, repo gone: say which, keep going
            failed.append(repo)
            lines.append(f"failed {repo}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        if n.present():
            lines.append(f"fetched {repo} -> {target}")
        else:  # the repo is there but not the files (renamed upstream, wrong patterns)
            failed.append(repo)
            lines.append(f"failed {repo}: no {', '.join(n.files or ('files',))} in the repo ({n.what})")
    lines.append(f"export ANONRISK_WEIGHTS={root}   # the presets' weights/... paths and hub ids now resolve under it")
    if failed:
        raise FetchFailed(lines, failed)
    return lines


class FetchFailed(Exception):
    def __init__(self, lines: list[str], failed: list[str]):
        super().__init__(f"{len(failed)} download(s) failed: {', '.join(failed)}")
        self.lines = lines
