"""GPU cases of the contrastive trainer (issue 18), importable by ``benchmarks/gpu_check.py``.

    python benchmarks/gpu_cases_training.py --device cuda                  # both cases, one H100/H200
    python benchmarks/gpu_cases_training.py --device cuda --case step_1m_pairs
    python benchmarks/gpu_cases_training.py --tiny --out /tmp/gpu_training.json  # toy sizes, CPU

Each case is one training step of the torch engine (``build_engine`` + ``contrastive_step`` + ``step``,
GradCache, BatchNorm frozen so chunking is exact) with inputs made per chunk from a seed (a loader's
stand-in: 10^6 images never sit in memory), run in a fresh process by ``train_throughput.run_worker``; the
result is its peak memory (``torch.cuda.max_memory_allocated``) and the seconds of the step. The headline
case is 1,048,576 pairs with ResNet-50 at 224 px in bf16 with the tiled loss; the untiled loss at 65,536
pairs is the reference beside it (its N x N matrices already take tens of GB there; at 10^6 they would
take terabytes). ``benchmarks/gpu_check.py`` imports the ``CASES`` (``step_1m_pairs``, ``tiled_vs_untiled``),
each a function of ``device`` and ``tiny`` returning its runs and figures beside a reference. Results:
``results/benchmarks/gpu_training.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

R50 = {"device": "cuda", "kind": "torch", "backbone": "resnet50", "image_size": 224, "embed_dim": 128,
       "precision": "bf16", "chunk": 1024, "inputs": "streamed", "warmup": 0}
TOY = {"device": "cpu", "kind": "torch", "backbone": "test_convnext", "image_size": 32, "embed_dim": 32,
       "precision": "fp32", "chunk": 32, "inputs": "streamed", "warmup": 0}
#: name -> (the worker spec of ``train_throughput.make_step``, the step's timeout in seconds)
SPECS = {
    "r50-224px-1m-tiled": ({**R50, "batch": 1_048_576, "tile": 8192}, 4 * 3600),
    "r50-224px-64k-tiled": ({**R50, "batch": 65_536, "tile": 8192}, 3600),
    "r50-224px-64k-untiled": ({**R50, "batch": 65_536, "tile": None}, 3600),
    "toy-4k-tiled": ({**TOY, "batch": 4096, "tile": 256}, 1200),
    "toy-256-tiled": ({**TOY, "batch": 256, "tile": 64}, 600),
    "toy-256-untiled": ({**TOY, "batch": 256, "tile": None}, 600),
}


def run_training_case(name: str, device: str | None = None) -> dict:
    """One spec in its own process: ``{"case", "batch", "tile", "fits", "peak_mem_gb", "seconds", ...}``
    (``fits`` False with the peak at the out-of-memory error, or ``error`` when the step failed otherwise)."""
    import train_throughput as tt

    spec, limit = SPECS[name]
    spec = {**spec, **({"device": device} if device else {})}
    result = tt.run_worker(spec, timeout=limit)
    keys = ("batch", "tile", "chunk", "backbone", "image_size", "precision", "device")
    return {"case": name, **{k: spec[k] for k in keys}, **result}


def _figure(name, value, reference_name, reference, unit):
    return {"name": name, "value": value, "unit": unit, "reference_name": reference_name, "reference": reference,
            "ratio": value / reference if value and reference else None}


def _checked(*results):
    bad = [r for r in results if not r.get("fits")]
    if bad:
        raise RuntimeError(f"step failed: {bad}")
    return results


def case_step_1m_pairs(device: str = "cuda", tiny: bool = False) -> dict:
    """One tiled GradCache step at 1,048,576 pairs (R50, 224 px, bf16): peak memory and seconds, beside the
    same step at 1/16 of the batch (seconds x 16: a step that scales linearly in the batch)."""
    big, small = ("toy-4k-tiled", "toy-256-tiled") if tiny else ("r50-224px-1m-tiled", "r50-224px-64k-tiled")
    ref, run = _checked(*(run_training_case(n, None if tiny else device) for n in (small, big)))
    scale = run["batch"] / ref["batch"]
    return {"runs": [ref, run], "figures": [
        _figure(f"peak memory GB, tiled GradCache step of {run['batch']} pairs", run["peak_mem_gb"],
                f"the same at {ref['batch']} pairs", ref["peak_mem_gb"], "GB"),
        _figure(f"seconds per step, {run['batch']} pairs", run["seconds"], f"{scale:.0f} x the step of {ref['batch']} pairs",
                ref["seconds"] * scale, "s")]}


case_step_1m_pairs.budget_s = 1800  # about 2 x 10^6 images through ResNet-50 twice (GradCache): many minutes
case_step_1m_pairs.tiny_budget_s = 300


def case_tiled_vs_untiled(device: str = "cuda", tiny: bool = False) -> dict:
    """The tiled and the untiled loss at one batch both fit (65,536 pairs on a GPU): step seconds and memory."""
    names = ("toy-256-tiled", "toy-256-untiled") if tiny else ("r50-224px-64k-tiled", "r50-224px-64k-untiled")
    tiled, untiled = _checked(*(run_training_case(n, None if tiny else device) for n in names))
    return {"runs": [tiled, untiled], "figures": [
        _figure(f"step seconds, tiled loss, {tiled['batch']} pairs", tiled["seconds"], "untiled loss", untiled["seconds"], "s"),
        _figure("peak memory GB, tiled loss", tiled["peak_mem_gb"], "untiled loss", untiled["peak_mem_gb"], "GB")]}


case_tiled_vs_untiled.budget_s = 300
case_tiled_vs_untiled.tiny_budget_s = 120
CASES = {"step_1m_pairs": case_step_1m_pairs, "tiled_vs_untiled": case_tiled_vs_untiled}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="default: both")
    ap.add_argument("--device", default="cuda", help="e.g. cuda:1")
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (the same code path)")
    ap.add_argument("--out", default=str(HERE.parent / "results" / "benchmarks" / "gpu_training.json"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = json.loads(out.read_text()) if out.exists() else {}
    for name in args.case or list(CASES):
        r = {**CASES[name](device=args.device, tiny=args.tiny), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        print(json.dumps(r), flush=True)
        doc[f"{name}{'-tiny' if args.tiny else ''}"] = r
        out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")  # after every case
    return 0


if __name__ == "__main__":
    sys.exit(main())
