"""What the privacy measures add to an attack's evaluate stage, as a ratio to the protocols it already scores.

    python benchmarks/privacy_cost.py                 # quickstart size (51 test identities x 8) and 10x that
    python benchmarks/privacy_cost.py --identities 51 --per-identity 8 --reps 5

Timed on one random probes x gallery similarity (the cost does not depend on the scores): the reference is
``score_similarity``-equivalent protocol scoring (every protocol x mode, ``bootstrap`` 1000); beside it
verification as configured by default (impostors_per_probe 20, bootstrap 100, first mode), verification
with every impostor pair (``impostors_per_probe: null``), and the anonymity sets. Interleaved ``--reps``
times, medians reported. Writes results/benchmarks/privacy_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv=None) -> int:
    import numpy as np
    import torch

    from anonrisk.config.schema import EvaluateConfig, VerificationConfig
    from anonrisk.evaluate.metrics import summarize
    from anonrisk.evaluate.privacy import privacy_measures
    from anonrisk.evaluate.protocols import score_protocols

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--identities", type=int, nargs="+", default=[51, 510])
    ap.add_argument("--per-identity", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="also verification with every impostor pair (slow: minutes)")
    args = ap.parse_args(argv)
    cfg = EvaluateConfig()
    rows = []
    for n_id in args.identities:
        ident = np.repeat(np.arange(n_id), args.per_identity)
        n = len(ident)
        sim = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
        src = np.arange(n)
        variants = {
            "protocols (reference)": lambda: {k: summarize(r, cfg.bootstrap, 0) for k, r in
                                              score_protocols(sim, ident, src, ident, cfg.protocols, cfg.modes, cfg.few_ref_k).items()},
            "verification (default)": lambda: privacy_measures(sim, ident, src, ident, cfg.modes, VerificationConfig(), False, 0),
            "anonymity sets": lambda: privacy_measures(sim, ident, src, ident, cfg.modes, None, True, 0),
        }
        if args.full:
            variants["verification (all impostors)"] = lambda: privacy_measures(
                sim, ident, src, ident, cfg.modes, VerificationConfig(impostors_per_probe=None), False, 0)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.reps):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        ref = statistics.median(times["protocols (reference)"])
        for name, ts in times.items():
            rows.append({"probes": n, "identities": n_id, "variant": name, "seconds": statistics.median(ts),
                         "ratio_to_protocols": statistics.median(ts) / ref})
    out = REPO / "results" / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    (out / "privacy_cost.json").write_text(json.dumps({"rows": rows, "reps": args.reps}, indent=1))
    md = ["| probes | variant | seconds | x protocols |", "|---|---|---|---|"]
    md += [f"| {r['probes']} | {r['variant']} | {r['seconds']:.3f} | {r['ratio_to_protocols']:.2f} |" for r in rows]
    (out / "privacy_cost.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
