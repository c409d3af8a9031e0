"""Re-identification vs contrastive batch size: one attack per (anonymizer, batch size), same data.

    python benchmarks/batch_size_study.py configs/studies/batch_size_quickstart.yaml   # CPU, minutes
    python benchmarks/batch_size_study.py configs/studies/batch_size_celeba.yaml       # GPUs, CelebA

The study file names a base run config plus overrides, the batch sizes, a fixed budget (``epochs``: steps =
ceil(epochs * training pairs / batch), or ``steps``: the same number of updates at every batch size), ``per_identity``, the lr scaling rule and the GradCache chunk used for
larger batches. Every cell is an ordinary pipeline run (fingerprinted stages: data and anonymization are
shared, a rerun reuses finished cells). Writes ``results/<name>/study.json``, ``study.md`` and ``plot.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def cell_overrides(study: dict, batch: int, train_pairs: int) -> list[str]:
    # fixed steps: every batch size gets as many updates; fixed epochs: every batch size sees as many images
    steps = study["steps"] if "steps" in study else math.ceil(study["epochs"] * train_pairs / batch)
    lr_rule = study.get("lr", {})
    # the trainer scales the peak lr itself (train.lr_scaling from train.lr_base_batch, docs/large_batch.md)
    out = [f"train.batch_size={batch}", f"train.steps={steps}", f"train.lr={lr_rule.get('base', 0.003):.6g}",
           f"train.lr_scaling={lr_rule.get('scaling', 'none')}", f"train.lr_base_batch={lr_rule.get('base_batch', batch)}",
           f"train.per_identity={study.get('per_identity', 2)}", f"train.checkpoint_every={max(steps // 4, 1)}"]
    if study.get("warmup_steps") is not None:  # at most the cell's steps (a fixed-epoch cell may have few)
        out.append(f"train.warmup_steps={min(study['warmup_steps'], steps)}")
    chunk = study.get("grad_cache_chunk")
    if chunk and batch > chunk:
        out.append(f"train.grad_cache_chunk={chunk}")
    return out


def main(argv=None) -> int:
    import yaml

    from anonrisk.attack.train import lr_schedule
    from anonrisk.config import load_config
    from anonrisk.pipeline import Pipeline
    from anonrisk.stages import read_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", help="study YAML (configs/studies/*.yaml)")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for every cell (e.g. runs_dir=/scratch/runs)")
    ap.add_argument("--batch-sizes", default=None, help="comma separated, replaces the study's list")
    ap.add_argument("--max-batch", type=int, default=None, help="run only batches up to this; the others are listed as not run")
    ap.add_argument("--steps", type=int, default=None, help="a fixed-steps budget in place of the study's (a reduced run)")
    ap.add_argument("--epochs", type=float, default=None, help="a fixed-epochs budget in place of the study's")
    ap.add_argument("--name", default=None, help="results/<name> (default: the study's name), e.g. for a reduced run")
    args = ap.parse_args(argv)
    path = Path(args.study)
    study = yaml.safe_load(path.read_text())
    for key in ("steps", "epochs"):
        if getattr(args, key) is not None:
            study.pop("steps", None), study.pop("epochs", None)
            study[key] = getattr(args, key)
    base = (path.parent / study["base"]).resolve()
    common = list(study.get("overrides", [])) + list(args.overrides)
    batches = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else study["batch_sizes"]
    not_run = [b for b in batches if args.max_batch and b > args.max_batch]
    batches = [b for b in batches if b not in not_run]
    metric = study.get("metric", "full-ref/exclude-source")

    probe = Pipeline(load_config(base, common))
    train_pairs = sum(r.split == "train" for r in probe.records)
    rows, t_start = [], time.perf_counter()
    for batch in batches:
        cfg = load_config(base, common + cell_overrides(study, batch, train_pairs))
        pipe = Pipeline(cfg)
        pipe.validate()
        for spec in cfg.anonymizers:
            t0 = time.perf_counter()
            trained = pipe.target(spec).trained()[0]  # the study's attack: the config's first trained one
            m = pipe.evaluate(spec, trained.name)
            train_stage = trained.train
            done = read_json(train_stage / "DONE")
            losses = [json.loads(x)["loss"] for x in (train_stage / "log.jsonl").read_text().splitlines()]
            top1 = m["protocols"][metric]["top1"]
            link = m["protocols"].get(metric.split("/")[0] + "/linkage", {}).get("top1", {})
            rows.append({"anonymizer": spec.name, "batch": batch, "steps": cfg.train.steps, "lr": lr_schedule(cfg.train).peak_lr,
                         "grad_cache_chunk": cfg.train.grad_cache_chunk, "top1": top1["value"], "ci95": top1["ci95"],
                         "chance": top1["chance"], "linkage_top1": link.get("value"), "final_loss": sum(losses[-5:]) / len(losses[-5:]),
                         "train_seconds": done.get("seconds"), "cell_seconds": time.perf_counter() - t0,
                         "train_fingerprint": train_stage.fingerprint})
            print(f"{spec.name} batch {batch}: top-1 {top1['value']:.3f} {top1['ci95']} ({cfg.train.steps} steps)", flush=True)

    out = Path(probe.cfg.results_dir) / (args.name or study["name"])
    out.mkdir(parents=True, exist_ok=True)
    doc = {"name": args.name or study["name"], "study": study, "base_config": str(base.relative_to(REPO)) if base.is_relative_to(REPO) else str(base),
           "overrides": common, "train_pairs": train_pairs, "train_identities": len({r.identity for r in probe.records if r.split == "train"}),
           "metric": metric, "rows": rows, "not_run": not_run, "command": " ".join(["python", *sys.argv]),
           "total_seconds": time.perf_counter() - t_start, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out / "study.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "study.md").write_text(render(doc))
    plot(doc, out / "plot.png")
    print(render(doc))
    return 0


def render(doc: dict) -> str:
    s = doc["study"]
    lines = [f"# Re-identification vs contrastive batch size: {doc.get('name', s['name'])}", "",
             f"`benchmarks/batch_size_study.py` on `{doc['base_config']}` with {', '.join(f'`{o}`' for o in doc['overrides'])}. "
             f"{budget(s, doc['train_pairs'])}, {s.get('per_identity')} images per identity per batch, lr "
             f"{s.get('lr', {}).get('scaling', 'fixed')}-scaled from {s.get('lr', {}).get('base')} at batch {s.get('lr', {}).get('base_batch')}; "
             f"GradCache chunk {s.get('grad_cache_chunk')} above it. Metric: top-1, {doc['metric']}, 95 % bootstrap interval by identity. "
             f"Total {doc['total_seconds'] / 60:.1f} min.", "",
             "| anonymizer | batch (pairs) | steps | lr | GradCache | top-1 | 95 % CI | linkage top-1 | final loss | train s |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in doc["rows"]:
        lines.append(f"| {r['anonymizer']} | {r['batch']} | {r['steps']} | {r['lr']:.4g} | {r['grad_cache_chunk'] or '-'} | "
                     f"{r['top1']:.3f} | [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | "
                     f"{'-' if r['linkage_top1'] is None else format(r['linkage_top1'], '.3f')} | {r['final_loss']:.3f} | "
                     f"{r['train_seconds'] or 0:.0f} |")
    chance = doc["rows"][0]["chance"] if doc["rows"] else None
    lines += ["", f"Chance top-1: {chance:.4f}." if chance else ""]
    if doc.get("train_identities"):
        lines += ["", f"{doc['train_identities']} training identities: the largest batch run holds "
                      f"{max(r['batch'] for r in doc['rows']) // s.get('per_identity', 2) if doc['rows'] else 0} of them."]
    if doc.get("not_run"):
        lines += ["", f"Not run here (over `--max-batch`): batches {', '.join(map(str, doc['not_run']))}; "
                      "run them with the study's command without `--max-batch`."]
    if doc.get("command"):
        lines += ["", f"Command: `{doc['command']}`"]
    return "\n".join(lines) + "\n"


def budget(s: dict, train_pairs: int) -> str:
    if "steps" in s:
        return f"Fixed budget: {s['steps']} steps at every batch size (a larger batch sees more images)"
    return (f"Fixed budget: {s['epochs']} epochs of {train_pairs} training pairs at every batch size "
            "(steps = epochs x pairs / batch: a larger batch takes fewer steps)")


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["anonymizer"] for r in doc["rows"]):
        rs = [r for r in doc["rows"] if r["anonymizer"] == name]
        xs = [r["batch"] for r in rs]
        ys = [r["top1"] for r in rs]
        lo = [r["top1"] - r["ci95"][0] for r in rs]
        hi = [r["ci95"][1] - r["top1"] for r in rs]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=name)
    if doc["rows"]:
        ax.axhline(doc["rows"][0]["chance"], color="grey", ls=":", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("contrastive batch (pairs)")
    ax.set_ylabel(f"top-1 ({doc['metric']})")
    s = doc["study"]
    ax.set_title(f"{s['name']}: fixed {s['steps']} steps" if "steps" in s else f"{s['name']}: fixed {s['epochs']} epochs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
