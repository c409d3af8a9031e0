"""The memory wall of the contrastive loss: untiled vs tiled loss, both under GradCache (issue 18, item 3).

    python benchmarks/train_tiled.py --device cpu      # largest batch under the 0.5 GB cap, then img/s
    python benchmarks/train_tiled.py --device cuda --backbone resnet50 --image-size 224 --search-chunk 512 \\
        --search-start 65536 --max-batch 1048576 --tile 8192 --batch-sizes 4096,16384   # one H100/H200
    python benchmarks/train_tiled.py --loss-only 16384 --embed-dim 64 --memory-cap-gb 4   # the loss alone

Written to merge into ``train_throughput.py`` once the engines take a loss tile: it reuses that script's
peak-RSS monitor and markdown layout (``- NAME (...): **N pairs**``, "tiled" in the tiled rows' names),
and its steps are the engine's GradCache step (``build_engine`` + ``grad_cache_step`` + ``step``) with the
loss swapped, as ``contrastive_step`` will do with ``loss_tile`` set (the tiled loss takes the chunk
embeddings as row blocks, so no concatenated copy of the batch is made). Differences from train_throughput:
- inputs are made per GradCache chunk from a seed (``--inputs streamed``, the default), as a loader reading
  from disk would, so a batch of 10^5 to 10^6 images never sits in memory; ``--inputs resident`` keeps the
  whole uint8 batch on the device, as train_throughput does (its images then count against the cap);
- positives are pairs (``labels=None``), the paper's attack.
Largest batch: doubling from ``--search-start`` until a step fails (CUDA OOM) or passes the CPU cap.
Throughput: tiled and untiled stepped round by round in one process at ``--batch-sizes`` (median step),
``tiled / untiled`` beside each other. ``--loss-only N``: peak memory of the loss's forward + backward
alone on random (N, d) embeddings, untiled vs tiled, each in its own process.
Results: ``results/benchmarks/train_tiled.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import train_throughput as tt  # noqa: E402  (PeakRSS, the markdown conventions)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backbone", default=None, help="default: test_convnext on cpu, resnet50 on cuda")
    ap.add_argument("--image-size", type=int, default=None, help="default 32 cpu, 224 cuda")
    ap.add_argument("--embed-dim", type=int, default=128)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--tile", type=int, default=None, help="loss tile (default: anonrisk.attack.tiled.default_tile)")
    ap.add_argument("--inputs", default="streamed", choices=["streamed", "resident"])
    ap.add_argument("--search-start", type=int, default=None, help="default 64 cpu, 1024 cuda")
    ap.add_argument("--max-batch", type=int, default=None, help="default 262144 cpu, 1048576 cuda")
    ap.add_argument("--search-chunk", type=int, default=None, help="GradCache chunk (default 32 cpu, 512 cuda)")
    ap.add_argument("--memory-cap-gb", type=float, default=0.5, help="CPU: a step using more than this does not fit")
    ap.add_argument("--batch-sizes", default=None, help="throughput at these batches (default 256,2048 cpu)")
    ap.add_argument("--iters", type=int, default=None, help="timed rounds (default 5 cpu, 5 cuda)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--loss-only", type=int, default=None, help="N: memory of the loss alone at N pairs, then exit")
    ap.add_argument("--out", default=str(REPO / "results" / "benchmarks"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ---- one configuration ---------------------------------------------------------------------------------
def make_step(spec: dict, device):
    """One GradCache training step (torch engine) at ``spec['batch']`` pairs with the untiled loss
    (``tile`` None) or the tiled one."""
    import torch

    from anonrisk.attack.engine import build_engine
    from anonrisk.attack.gradcache import grad_cache_step
    from anonrisk.attack.losses import gathered_contrastive_loss
    from anonrisk.attack.model import Encoder
    from anonrisk.attack.tiled import tiled_gathered_loss
    from anonrisk.config.schema import AttackConfig

    b, chunk, size, tile = spec["batch"], spec["chunk"], spec["image_size"], spec.get("tile")
    cfg = AttackConfig(backbone=spec["backbone"], input="rgb", embed_dim=spec["embed_dim"], batch_size=b, lr=1e-4,
                       engine="torch", precision=spec["precision"], grad_cache_chunk=chunk, freeze_bn=True)
    engine, _ = build_engine(cfg, str(device))

    def images(start: int, side: int):  # the same uint8 rows on every call (embedding pass and re-run)
        g = torch.Generator(device=device).manual_seed(1_000_003 * side + start)  # made on the device: no copy
        return torch.randint(0, 256, (chunk, 3, size, size), generator=g, dtype=torch.uint8, device=device)

    if spec.get("inputs") == "resident":
        whole = [torch.cat([images(i, side) for i in range(0, b, chunk)]) for side in (0, 1)]
        make = lambda i: lambda: Encoder.preprocess(torch.cat([whole[0][i:i + chunk], whole[1][i:i + chunk]]))  # noqa: E731
    else:
        make = lambda i: lambda: Encoder.preprocess(torch.cat([images(i, 0), images(i, 1)]))  # noqa: E731
    inputs = [make(i) for i in range(0, b, chunk)]

    def loss_fn(embs, t):
        a, p = [e[: e.shape[0] // 2] for e in embs], [e[e.shape[0] // 2:] for e in embs]
        if tile:  # the chunks' halves as row blocks: the tiled loss never concatenates them
            return tiled_gathered_loss(a, p, t.float(), None, tile=tile)
        return gathered_contrastive_loss(torch.cat(a), torch.cat(p), t.float(), None)

    def step():
        grad_cache_step(engine.forward, inputs, loss_fn, engine.backward, engine.chunk)
        engine.step(1e-4)

    return step


def make_loss_only(spec: dict, device):
    """Forward + backward of the loss alone on random unit (N, d) embeddings."""
    import torch
    import torch.nn.functional as F

    from anonrisk.attack.losses import contrastive_loss
    from anonrisk.attack.tiled import tiled_contrastive_loss

    g = torch.Generator().manual_seed(0)
    a, b = (F.normalize(torch.randn(spec["batch"], spec["embed_dim"], generator=g), dim=1).to(device).requires_grad_()
            for _ in range(2))

    def step():
        if spec.get("tile"):
            loss = tiled_contrastive_loss(a, b, 0.1, tile=spec["tile"])
        else:
            loss = contrastive_loss(a, b, 0.1)
        loss.backward()

    return step


def worker_memory(spec: dict) -> dict:
    import torch

    device = torch.device(spec["device"])
    import timm  # noqa: F401  (imports are not the step's memory)

    import anonrisk.attack.engine  # noqa: F401
    import anonrisk.attack.tiled  # noqa: F401

    monitor = tt.PeakRSS(spec.get("cap_bytes")) if device.type == "cpu" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        step = (make_loss_only if spec.get("loss_only") else make_step)(spec, device)
        t0 = time.perf_counter()
        step()
        tt._sync(device)
    except torch.OutOfMemoryError:
        return {"fits": False, "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else monitor.peak
    return {"fits": True, "peak_mem_gb": peak / 2**30, "seconds": time.perf_counter() - t0}


def worker_timing(spec: dict) -> dict:
    """Untiled and tiled GradCache steps in one process, interleaved round by round (median step)."""
    import torch

    device = torch.device(spec["device"])
    steps = {c["label"]: make_step({**spec["common"], **c}, device) for c in spec["configs"]}
    for _ in range(spec["warmup"]):
        for step in steps.values():
            step()
    times = {k: [] for k in steps}
    for _ in range(spec["rounds"]):
        for k, step in steps.items():
            t0 = time.perf_counter()
            step()
            tt._sync(device)
            times[k].append(time.perf_counter() - t0)
    b = spec["common"]["batch"]
    return {k: {"img_per_s": 2 * b / statistics.median(v), "step_s": statistics.median(v)} for k, v in times.items()}


def run_worker(spec: dict, timeout: float = 4 * 3600) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    return {"fits": False, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}


# ---- the driver ------------------------------------------------------------------------------------------
def search(base: dict, label: str, tile, start: int, top: int, cap) -> dict:
    """Doubling search (train_throughput's ``largest_batch`` entry format)."""
    b, best, tried = start, None, []
    while b <= top:
        r = run_worker({**base, "batch": b, "tile": tile, "cap_bytes": cap})
        tried.append({"batch": b, **r})
        print(f"search {label} b={b}: {r}", file=sys.stderr, flush=True)
        if not r.get("fits"):
            break
        best, b = b, b * 2
    return {"largest_batch": best, "chunk": base["chunk"], "tile": tile, "tried": tried, "capped_at_max": best == top}


def main(argv=None):
    args = parse(argv)
    if args.worker:
        spec = json.loads(args.worker)
        if spec.get("threads"):
            import torch

            torch.set_num_threads(spec["threads"])
        print(json.dumps(worker_timing(spec) if spec.get("mode") == "timing" else worker_memory(spec)), flush=True)
        return 0
    from anonrisk.attack.tiled import default_tile

    cuda = args.device.startswith("cuda")
    tile = args.tile or default_tile(args.device)
    cap = None if cuda else args.memory_cap_gb * 2**30
    base = {"device": args.device, "backbone": args.backbone or ("resnet50" if cuda else "test_convnext"),
            "image_size": args.image_size or (224 if cuda else 32), "embed_dim": args.embed_dim,
            "precision": args.precision if args.precision != "auto" else ("bf16" if cuda else "fp32"),
            "chunk": args.search_chunk or (512 if cuda else 32), "inputs": args.inputs, "threads": args.threads}
    if args.loss_only:
        for label, t in (("untiled", None), (f"tiled (tile {tile})", tile)):
            r = run_worker({**base, "loss_only": True, "batch": args.loss_only, "tile": t, "cap_bytes": cap})
            print(f"loss alone, N={args.loss_only}, d={args.embed_dim}, {label}: {r}")
        return 0
    entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), **base, "tile": tile,
             "memory_cap_gb": None if cuda else args.memory_cap_gb, "largest_batch": {}, "throughput": []}
    if not args.skip_search:
        start, top = args.search_start or (1024 if cuda else 64), args.max_batch or (1048576 if cuda else 262144)
        c = base["chunk"]
        entry["largest_batch"] = {f"gradcache (chunk {c})": search(base, "untiled", None, start, top, cap),
                                  f"tiled gradcache (chunk {c}, tile {tile})": search(base, "tiled", tile, start, top, cap)}
    if not args.skip_timing:
        for b in [int(x) for x in (args.batch_sizes or ("4096,16384" if cuda else "256,2048")).split(",")]:
            configs = [{"label": "untiled", "tile": None}, {"label": "tiled", "tile": tile}]
            r = run_worker({"mode": "timing", "device": args.device, "threads": args.threads, "configs": configs,
                            "common": {**base, "batch": b}, "rounds": args.iters or 5, "warmup": args.warmup})
            print(f"timing b={b}: {r}", file=sys.stderr, flush=True)
            entry["throughput"].append({"batch": b, **r})
    import torch

    key = f"{'cuda' if cuda else 'cpu'}-{base['backbone']}-{base['image_size']}px"
    entry["device_name"] = torch.cuda.get_device_name(0) if cuda else f"CPU ({args.threads or torch.get_num_threads()} threads)"
    entry["torch"] = torch.__version__
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "train_tiled.json"
    doc = json.loads(jpath.read_text()) if jpath.exists() else {}
    doc[key] = entry
    jpath.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    (out / "train_tiled.md").write_text(render(doc))
    print(render({key: entry}))
    return 0


def render(doc: dict) -> str:
    lines = ["# Contrastive batch limit: untiled vs tiled loss under GradCache", "",
             "Written by `benchmarks/train_tiled.py`: one GradCache training step of the torch engine per "
             "configuration, in its own process (peak memory), inputs made per chunk unless noted; the untiled loss "
             "holds (N x N) similarity matrices, the tiled one (anonrisk/attack/tiled.py) (tile x tile) blocks.", ""]
    for key, e in sorted(doc.items()):
        lines += [f"## {key}: {e['device_name']}", "",
                  f"{e['time']}; torch {e['torch']}; {e['backbone']} at {e['image_size']} px, {e['precision']}, "
                  f"embedding {e['embed_dim']}, inputs {e['inputs']}, pairs as positives.", ""]
        if e["largest_batch"]:
            cap = f" under a {e['memory_cap_gb']} GB cap" if e.get("memory_cap_gb") else ""
            lines += [f"Largest contrastive batch on one device{cap} (doubling search):", ""]
            for label, s in e["largest_batch"].items():
                more = " (search stopped at --max-batch: more fits)" if s["capped_at_max"] else ""
                mems = ", ".join(f"{t['batch']}: {t.get('peak_mem_gb', 0):.2f} GB" for t in s["tried"])
                lines.append(f"- {label}: **{s['largest_batch']} pairs**{more}; tried {mems}")
            found = [s["largest_batch"] for s in e["largest_batch"].values()]
            if len(found) == 2 and all(found):
                lines += ["", f"Tiled / untiled largest batch: **{found[1] / found[0]:.0f}x**."]
            lines.append("")
        if e["throughput"]:
            lines += ["| batch (pairs) | untiled img/s | tiled img/s | tiled / untiled |", "|---:|---:|---:|---:|"]
            for r in e["throughput"]:
                u, t = r["untiled"]["img_per_s"], r["tiled"]["img_per_s"]
                lines.append(f"| {r['batch']} | {u:.1f} | {t:.1f} | {t / u:.2f} |")
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
