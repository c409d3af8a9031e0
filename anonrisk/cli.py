"""``anonrisk``: the command line. Heavy libraries are imported inside the commands, so --help is instant.

Every user-facing failure is an ``AnonriskError``: printed as one clear message, exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

STAGES = ("prepare", "anonymize", "train", "evaluate", "report")


def _load(args):
    from anonrisk.config import load_config

    return load_config(args.config, args.overrides)


def _select(pipe, names):
    """The planned targets, or those named by --only."""
    targets = pipe.plan.targets
    if names:
        unknown = [n for n in names if n not in targets]
        if unknown:
            from anonrisk.errors import ConfigError

            raise ConfigError(f"--only: unknown anonymizer(s) {', '.join(unknown)}; in this config: {', '.join(sorted(targets))}")
    return [t for name, t in targets.items() if not names or name in names]


def cmd_run(args) -> int:
    from anonrisk.pipeline import Pipeline

    doc = Pipeline(_load(args)).run(args.only)
    print(doc["table"])
    print(f"results: {doc['results_dir']}/ (metrics.json, report.md, plots/)")
    if doc.get("mlflow"):
        from anonrisk.tracking.mlflow_log import ui_hint

        m = doc["mlflow"]
        print(ui_hint(m["tracking_uri"], m["experiment_id"], m["parent_run_id"]))
    return 0


def cmd_stage(args) -> int:
    from anonrisk.pipeline import Pipeline

    pipe = Pipeline(_load(args))
    if args.command == "prepare":
        stage = pipe.prepare()
        print(f"prepare: {stage.path} ({len(pipe.records)} records)")
        return 0
    if args.command == "report":
        pipe.prepare()
        unavailable = pipe.validate_attacks()
        missing = [f"{t.name} x {a.name}" for t in pipe.plan.targets.values() for a in t.attacks.values()
                   if a.name not in unavailable and not a.evaluate.is_done()]
        if missing:
            from anonrisk.errors import AnonriskError

            raise AnonriskError(f"report: no finished evaluation for {', '.join(missing)}; run `anonrisk evaluate` (or `anonrisk run`) first")
        doc = pipe.run()
        print(doc["table"])
        return 0
    pipe.validate()  # anonymizers and the training plans
    if args.command != "anonymize":
        pipe.prepare()
        unavailable = pipe.validate_attacks()
    for t in _select(pipe, args.only):
        if args.command == "anonymize":
            print(f"anonymize {t.name}: {pipe.anonymize(t).path}")
        elif args.command == "train":
            if not t.trained():
                print(f"train {t.name}: none of the attacks ({', '.join(t.attacks)}) trains an encoder")
            for a in t.trained():
                print(f"train {t.name} ({a.name}): {pipe.train(t, a.name).path}")
        else:
            for a in t.attacks.values():
                if a.name in unavailable:
                    print(f"evaluate {t.name} ({a.name}): skipped: {unavailable[a.name]}")
                    continue
                m = pipe.evaluate(t, a.name)
                top1 = next(iter(m["protocols"].values()))["top1"]["value"]
                print(f"evaluate {t.name} ({a.name}): {a.evaluate.path} (top-1 {top1:.3f})")
    return 0


def cmd_sweep(args) -> int:
    from anonrisk.launch.sweep import load_sweeps, run_sweeps

    summary = run_sweeps(_load(args), load_sweeps(args.sweeps), args.config)
    print((Path(summary["results_dir"]) / "sweep.md").read_text())
    print(f"results: {summary['results_dir']}/ (sweep.json, sweep.md, plots/sweep_*.png, report.md, leaderboard.md)")
    return 0


def cmd_validate(args) -> int:
    import yaml

    from anonrisk.pipeline import Pipeline

    cfg = _load(args)
    pipe = Pipeline(cfg)
    pipe.validate()
    settings = pipe.plan.dataset.p.model_dump(mode="json")
    if settings:  # the dataset kind's settings with their defaults
        setattr(cfg.data, cfg.data.dataset, settings)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    print(f"# valid: {args.config or '<defaults>'}", file=sys.stderr)
    return 0


def cmd_ls(args) -> int:
    from anonrisk.launch.listing import list_presets, list_stages

    if args.what == "kinds":
        print_kinds()
        print(list_presets())
        return 0
    print(list_stages(args.runs_dir, args.results_dir))
    return 0


def cmd_audit(args) -> int:
    from anonrisk.launch.audit import run_audit

    attacks = tuple(a for a in ("edge", "recognizer") if not (a == "recognizer" and args.no_recognizer))
    text, out = run_audit(args.originals, args.anonymized, args.out, args.labels, args.image_size, attacks)
    print(text)
    print(f"written: {out}/audit.md, report.md, metrics.json, leaderboard.md")
    return 0


def print_kinds() -> int:
    """Every anonymizer, attack and dataset kind with the package it comes from and its settings; plugins that
    failed to load with the reason (they never hide the others)."""
    from anonrisk.plan import kinds

    for kind, infos in kinds().items():
        print(f"{kind}s:")
        for k in infos:
            if k.error:
                print(f"  {k.name:14s} [{k.package}] FAILED: {k.error}")
                continue
            items = [f"{n}={f.default!r}" if not f.is_required() else f"{n} (required)" for n, f in k.params.model_fields.items()]
            fields = ", ".join(items[:6]) + (f", ... ({len(items)} settings)" if len(items) > 6 else "")
            print(f"  {k.name:14s} [{k.package}] {fields}")
    return 0


def _grid_plan(args, check: bool = True):
    from anonrisk.config.loader import parse_override
    from anonrisk.launch.grid import plan_grid

    dotted = dict(parse_override(item) for item in args.overrides)  # kept dotted: they join the grid's ``fixed``
    return plan_grid(args.grid, dotted, check=check), dotted


def cmd_grid(args) -> int:
    from anonrisk.launch import driver

    if args.grid_command == "plan":
        plan, _ = _grid_plan(args, check=not args.no_check)
        print(f"grid {plan.spec.name}: {len(plan.cells)} cells, profile {plan.profile.name}")
        for stage in ("prepare", "anonymize", "train", "evaluate"):
            nodes = plan.stage_nodes(stage)
            done = sum(plan.is_done(n) for n in nodes)
            print(f"  {stage:10s} {len(nodes):4d} jobs ({done} done)")
        for c in plan.cells:
            print(f"  cell {c.id}")
        return 0
    if args.grid_command == "submit":
        plan, dotted = _grid_plan(args)
        out = driver.submit(plan, args.executor, dotted, wait=args.wait)
        if "message" in out:
            print(out["message"])
        else:
            verb = "submitted" if args.executor == "slurm" else "ran"  # Slurm: one array per stage (and per MaxArraySize)
            for stage, ids in out["submitted"].items():
                print(f"{stage:10s} {verb}: {', '.join(ids)}")
            if "collect" in out:
                print(out["collect"]["table"])
                print(f"results: {out['collect']['results_dir']}/")
        return 0
    if args.grid_command == "status":
        from anonrisk.launch.status import format_status, status

        plan, _ = _grid_plan(args, check=False)
        st = status(plan)
        print(format_status(st))
        return 0 if not st["problems"] else 1
    from anonrisk.launch.collect import collect

    plan, _ = _grid_plan(args, check=False)
    out = collect(plan, strict=args.strict)
    print(out["table"])
    print(f"results: {out['results_dir']}/ ({out['finished']} of {len(plan.cells)} cells)")
    return 0


def cmd_compare(args) -> int:
    from anonrisk.launch.compare import comparison_plot, comparison_table, rows_from_json, rows_from_mlflow
    from anonrisk.stages import atomic_path

    rows = [r for src in args.sources for r in rows_from_json(src)]
    if args.mlflow:
        rows += rows_from_mlflow(args.mlflow, args.experiment, args.grid)
    unique: dict = {}
    for r in rows:  # a cell read from both JSON and MLflow counts once (the JSON, the source of truth)
        unique.setdefault((r["source"], r["cell"]), r)
    rows = list(unique.values())
    table = comparison_table(rows, args.metric, args.rows, args.cols)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "comparison.md") as tmp:
            tmp.write_text(table)
        comparison_plot(rows, out / "comparison.png", args.metric, args.rows, args.cols)
        print(f"written: {out}/comparison.md, {out}/comparison.png")
    return 0


def cmd_weights(args) -> int:
    from anonrisk.launch import weights

    items = weights.needs(args.target, args.fetch or args.root)
    print(weights.table(items))
    if args.fetch:
        try:
            lines = weights.fetch(items, args.fetch)
        except weights.FetchFailed as exc:
            print("\n".join(exc.lines))
            print(f"anonrisk: error: {exc}", file=sys.stderr)
            return 1
        print("\n".join(lines))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anonrisk", description="Measure how much identity survives image anonymization.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("config", nargs="?", help="YAML config (e.g. configs/quickstart.yaml)")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.backbone=resnet18 anonymizers=[identity,blur]")
        return sp

    r = with_config(sub.add_parser("run", help="prepare, anonymize, train, evaluate and report"))
    r.add_argument("--only", nargs="+", metavar="NAME", help="only these anonymizers")
    r.set_defaults(fn=cmd_run)
    for stage in STAGES:
        sp = with_config(sub.add_parser(stage, help=f"run the {stage} stage (and what it needs)"))
        sp.add_argument("--only", nargs="+", metavar="NAME", help="only these anonymizers")
        sp.set_defaults(fn=cmd_stage)
    sw = with_config(sub.add_parser("sweep", help="leakage sweeps: re-identification and edge leakage against one anonymizer parameter"))
    sw.add_argument("--sweeps", required=True, metavar="FILE", help="YAML sweep file (e.g. configs/sweeps/leakage.yaml)")
    sw.set_defaults(fn=cmd_sweep)
    with_config(sub.add_parser("validate", help="check a config and print it resolved")).set_defaults(fn=cmd_validate)
    grid = sub.add_parser("grid", help="run a grid of datasets x anonymizers x backbones x seeds (Slurm, local, debug)")
    gsub = grid.add_subparsers(dest="grid_command", required=True)
    for name, text in (("plan", "expand and validate a grid; show its cells and stage jobs"),
                       ("submit", "submit every stage that is neither done nor queued"),
                       ("status", "per stage: done, queued, failed, not submitted"),
                       ("collect", "gather finished cells into results/<grid>/ and MLflow")):
        gp = gsub.add_parser(name, help=text)
        gp.add_argument("grid", help="grid file (configs/grids/smoke.yaml) or a name under configs/grids/")
        gp.add_argument("overrides", nargs="*", help="dotted settings for every cell, e.g. runs_dir=/scratch/runs")
        gp.set_defaults(fn=cmd_grid)
        if name == "plan":
            gp.add_argument("--no-check", action="store_true", help="skip the checks of backbones, dataset roots and weights")
        if name == "submit":
            gp.add_argument("--executor", choices=("slurm", "local", "debug"), default="slurm")
            gp.add_argument("--wait", action="store_true", help="(slurm) return only when no job of the grid is queued")
        if name == "collect":
            gp.add_argument("--strict", action="store_true", help="exit non-zero when a cell has no result")
    cmp_ = sub.add_parser("compare", help="comparison table and plot from results/ folders and/or MLflow")
    cmp_.add_argument("sources", nargs="*", help="results folders or metrics.json files (grids or runs)")
    cmp_.add_argument("--mlflow", metavar="URI", help="also read the grid runs of an MLflow experiment")
    cmp_.add_argument("--experiment", default="anonrisk")
    cmp_.add_argument("--grid", help="only this grid's runs (MLflow)")
    cmp_.add_argument("--metric", default="worst.full-ref.exclude-source.top1",
                      help="any MLflow metric name, e.g. contrastive.few-ref.linkage.top1, leakage.edge_ssim, utility.psnr")
    cmp_.add_argument("--rows", help="axis down the table (default: anonymizer)")
    cmp_.add_argument("--cols", help="axis across (default: the first other axis that varies)")
    cmp_.add_argument("--out", help="write comparison.md and comparison.png here")
    cmp_.set_defaults(fn=cmd_compare)
    w = sub.add_parser("weights", help="the weights a preset or grid needs: source, local place, present or not; --fetch downloads them")
    w.add_argument("target", help="an anonymizer preset (camouflage-base-paper) or a grid (configs/grids/full.yaml)")
    w.add_argument("--root", help="the weights root to check (default: $ANONRISK_WEIGHTS, else ./weights)")
    w.add_argument("--fetch", metavar="DIR", help="download what is missing into DIR (huggingface_hub; HF_ENDPOINT picks the server)")
    w.set_defaults(fn=cmd_weights)
    au = sub.add_parser("audit", help="privacy report for a folder of originals and a folder of their anonymized images (no config)")
    au.add_argument("originals", help="folder of original images")
    au.add_argument("anonymized", help="folder of anonymized images at the same relative paths (any image extension)")
    au.add_argument("--out", help="results folder (default ./audit-<ANONYMIZED name>)")
    au.add_argument("--labels", choices=["none", "folders"], default="none",
                    help="none: every image its own identity (linkage only); folders: ORIGINALS/<identity>/<image>")
    au.add_argument("--image-size", type=int, default=112, help="working size in pixels (default 112)")
    au.add_argument("--no-recognizer", action="store_true", help="skip the off-the-shelf recognizer (dlib)")
    au.set_defaults(fn=cmd_audit)
    ls = sub.add_parser("ls", help="list stage directories (anonymizer, attack, backbone, state, size, age) and results; "
                                   "`ls kinds`: every kind with its package and settings, and the presets")
    ls.add_argument("what", nargs="?", choices=["stages", "kinds"], default="stages",
                    help="kinds: the anonymizer, attack and dataset kinds, plugins included, and the anonymizer presets")
    ls.add_argument("--runs-dir", default="runs")
    ls.add_argument("--results-dir", default="results")
    ls.set_defaults(fn=cmd_ls)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from anonrisk.errors import AnonriskError
    from anonrisk.launch.ranks import quiet_other_ranks

    quiet_other_ranks(logging.DEBUG if args.verbose else logging.INFO)  # under torchrun: rank 0 talks

    try:
        return args.fn(args)
    except AnonriskError as exc:
        if args.verbose:
            raise
        code = getattr(exc, "exit_code", 2)  # a checkpoint-and-stop is no error: its own code (train.Preempted)
        print(f"anonrisk: {'error: ' if code == 2 else ''}{exc}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("anonrisk: interrupted; finished shards and checkpoints are kept, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
