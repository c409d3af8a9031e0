"""Evaluation scaling: time and peak memory of scoring every protocol x mode, streaming vs materialised.

    python benchmarks/eval_scaling.py                        # 20k, 100k and 200k embeddings (the record)
    python benchmarks/eval_scaling.py --sizes 20000 --device cuda

Synthetic data: N gallery images of N / 20 identities (1,000 identities at 20k, proportionally more above),
each identity a random unit centre, each image centre + noise, and N probes (one per gallery image, its
source, with more noise), ``--dim``-d float32 unit vectors. Every protocol (full-ref, few-ref k = 5,
single-ref) x mode (exclude-source, linkage), score = max, pool = all, then ``summarize`` with
``--bootstrap`` (1,000) resamples, as the evaluate stage does.
- ``streaming``: ``score_protocols`` over ``EmbeddingSimilarity`` (blocks of probe rows against the whole
  gallery; the matrix never exists).
- ``materialised``: the v2 reference (``protocols_reference``): the full probes x gallery matrix, then
  ``score_protocol_materialised`` per protocol x mode; run only where the matrix fits
  (``--reference-max``, default 20,000). Its ranks are compared with the streaming ranks (``identical``).
Each (size, scorer) runs in a fresh process; peak memory is that process's peak resident set size
(``ru_maxrss``), also shown above its size once the embeddings exist. Results:
``results/benchmarks/eval_scaling.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PROTOCOLS = ("full-ref", "few-ref", "single-ref")
MODES = ("exclude-source", "linkage")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="20000,100000,200000", help="embeddings (probes = gallery), comma separated")
    ap.add_argument("--per-identity", type=int, default=20, help="gallery images per identity")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--block-elems", type=int, default=1 << 24, help="probe rows x gallery per streaming block")
    ap.add_argument("--reference-max", type=int, default=20000, help="largest size the materialised reference runs at")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    ap.add_argument("--note", default="", help="recorded with the results, e.g. 'provisional: shared machine'")
    ap.add_argument("--out", default=str(REPO / "results" / "benchmarks"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def synthetic(n: int, n_ids: int, dim: int, seed: int = 0):
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(seed)
    identity = torch.arange(n) % n_ids
    centres = torch.nn.functional.normalize(torch.randn(n_ids, dim, generator=g), dim=1)
    gallery = torch.nn.functional.normalize(centres[identity] + 0.6 * torch.randn(n, dim, generator=g) / dim**0.5 * 4, dim=1)
    probes = torch.nn.functional.normalize(gallery + 1.2 * torch.randn(n, dim, generator=g) / dim**0.5 * 4, dim=1)
    return probes, gallery, identity.numpy().astype(np.int64)


def worker(spec: dict) -> dict:
    import numpy as np
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from anonrisk.evaluate.metrics import summarize
    from anonrisk.evaluate.protocols import EmbeddingSimilarity, score_protocols
    from anonrisk.evaluate.protocols_reference import score_protocol_materialised

    n, n_ids = spec["n"], spec["identities"]
    probes, gallery, ident = synthetic(n, n_ids, spec["dim"])
    source = np.arange(n)
    base = peak_rss_gb()
    sync = torch.cuda.synchronize if spec["device"] == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    if spec["scorer"] == "streaming":
        sim = EmbeddingSimilarity(probes, gallery, spec["device"])
        results = score_protocols(sim, ident, source, ident, PROTOCOLS, MODES, device=spec["device"], block_elems=spec["block_elems"])
    else:
        sim = (probes.to(spec["device"]) @ gallery.to(spec["device"]).t()).cpu()
        results = {f"{p}/{m}": score_protocol_materialised(sim, ident, source, ident, p, m) for p in PROTOCOLS for m in MODES}
    sync()
    t1 = time.perf_counter()
    summaries = {key: summarize(res, spec["bootstrap"], 0) for key, res in results.items()}
    t2 = time.perf_counter()
    ranks_path = spec.get("ranks_path")
    if ranks_path:
        np.savez(ranks_path, **{key.replace("/", "__"): res.ranks for key, res in results.items()})
    out = {"score_s": t1 - t0, "bootstrap_s": t2 - t1, "total_s": t2 - t0, "peak_rss_gb": peak_rss_gb(),
           "peak_above_data_gb": peak_rss_gb() - base, "top1": {k: v["top1"]["value"] for k, v in summaries.items()}}
    if spec["device"] == "cuda":
        out["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def run_worker(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:300] if (proc.stderr or proc.stdout) else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def render(doc: dict) -> str:
    lines = ["# Evaluation scaling: every protocol x mode, streaming vs materialised\n",
             f"{doc['device']}, {doc['dim']}-d embeddings, {doc['per_identity']} images per identity, score = max, "
             f"{doc['bootstrap']} bootstrap resamples per protocol x mode. Peak memory: peak RSS of a fresh process."
             + (f" **{doc['note']}**" if doc.get("note") else "") + "\n",
             "| embeddings | identities | scorer | scoring s | bootstrap s | total s | peak RSS GB | vs materialised (time, memory) | same ranks |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in doc["rows"]:
        if "error" in row:
            lines.append(f"| {row['n']} | {row['identities']} | {row['scorer']} | failed: {row['error']} | | | | | |")
            continue
        ref = next((r for r in doc["rows"] if r["n"] == row["n"] and r["scorer"] == "materialised" and "error" not in r), None)
        ratio = f"{row['total_s'] / ref['total_s']:.2f}x, {row['peak_rss_gb'] / ref['peak_rss_gb']:.2f}x" if ref and row is not ref else "-"
        same = {True: "yes", False: "**no**", None: "-"}[row.get("identical")]
        lines.append(f"| {row['n']} | {row['identities']} | {row['scorer']} | {row['score_s']:.1f} | {row['bootstrap_s']:.1f} | "
                     f"{row['total_s']:.1f} | {row['peak_rss_gb']:.2f} | {ratio} | {same} |")
    lines.append("\nRanks compared exactly wherever the materialised reference ran. Command: "
                 f"`{doc['command']}`.\n")
    return "\n".join(lines)


def main(argv=None):
    args = parse(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    import numpy as np

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        n_ids = max(2, n // args.per_identity)
        ranks = {}
        for scorer in ("materialised", "streaming"):
            if scorer == "materialised" and n > args.reference_max:
                continue
            path = out / f".eval_scaling_{scorer}_{n}.npz"
            spec = {"n": n, "identities": n_ids, "dim": args.dim, "bootstrap": args.bootstrap, "device": args.device,
                    "scorer": scorer, "block_elems": args.block_elems, "threads": args.threads, "ranks_path": str(path)}
            row = {"n": n, "identities": n_ids, "scorer": scorer, **run_worker(spec)}
            if path.exists():
                with np.load(path) as f:
                    ranks[scorer] = {k: f[k] for k in f.files}
                path.unlink()
            rows.append(row)
            print(json.dumps(row), flush=True)
        if len(ranks) == 2:
            rows[-1]["identical"] = all(np.array_equal(ranks["streaming"][k], ranks["materialised"][k]) for k in ranks["materialised"])
    doc = {"benchmark": "eval_scaling", "device": args.device, "dim": args.dim, "per_identity": args.per_identity,
           "bootstrap": args.bootstrap, "note": args.note, "host": platform.node(), "cpus": os.cpu_count(),
           "command": shlex.join(["python", "benchmarks/eval_scaling.py", *(argv if argv is not None else sys.argv[1:])]), "rows": rows}
    (out / "eval_scaling.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    (out / "eval_scaling.md").write_text(render(doc))
    print(render(doc))


if __name__ == "__main__":
    main()
