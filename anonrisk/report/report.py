"""Write ``results/<run>/``: metrics.json (schema-versioned), config.yaml, report.md, plots/*.png (MLflow
is logged by the pipeline, ``tracking/run_log.py``). The only pictures of faces are the samples grids
(``plots/samples_<anonymizer>.png``): anonymized test images, with their originals beside them only for
synthetic data or when ``tracking.sample_originals`` asks."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import yaml

from anonrisk import __version__
from anonrisk.config.schema import RunConfig
from anonrisk.stages import StageDir, atomic_path, read_json, write_json

log = logging.getLogger("anonrisk")

SCHEMA = "anonrisk.results"
# 2: results[anonymizer] is a report card: {"anonymizer", "fingerprints", "attacks": {name: {..., "protocols"}
#    or {..., "skipped": reason}}, "leakage", "utility"}; v1 had one attack's "protocols" at the top
SCHEMA_VERSION = 2
MAIN = "full-ref/exclude-source"


def card_plot_name(anonymizer: str) -> str:
    import re

    return "card_" + re.sub(r"[^A-Za-z0-9_.-]", "_", anonymizer) + ".png"


def sample_plot_name(anonymizer: str) -> str:
    return card_plot_name(anonymizer).replace("card_", "samples_", 1)


def write_samples(cfg: RunConfig, data_stage: StageDir, name: str, anonymize_stage: StageDir, path: Path,
                  originals: bool | None = None, images_per_identity: int = 3) -> bool:
    """The samples grid of one anonymizer: its images of the first ``tracking.samples`` test identities
    (sorted, so every run shows the same people). Originals beside them when ``originals`` (default:
    ``tracking.sample_originals``, else only for synthetic data). False when there is nothing to show."""
    from anonrisk.data.io import load_image
    from anonrisk.data.records import read_manifest
    from anonrisk.report.plots import plot_samples

    manifest = anonymize_stage / "manifest.jsonl"
    if cfg.tracking.samples == 0 or not manifest.exists():
        return False
    if originals is None:
        originals = cfg.tracking.sample_originals if cfg.tracking.sample_originals is not None else cfg.data.dataset == "synthetic"
    by_identity: dict[str, list] = {}
    for r in sorted(read_manifest(manifest), key=lambda r: (r.identity, r.id)):
        if r.split == "test":
            by_identity.setdefault(r.identity, []).append(r)
    chosen = sorted(by_identity)[: cfg.tracking.samples]
    if not chosen:
        return False
    source = {r.id: r.path for r in read_manifest(data_stage / "manifest.jsonl")} if originals else {}
    rows = [[(load_image(source[r.id]) if r.id in source else None, load_image(r.path)) for r in by_identity[i][:images_per_identity]]
            for i in chosen]
    note = "originals beside them" if originals else "anonymized only"
    plot_samples(name, rows, path, note)
    return True


def check_schema(doc: dict) -> dict:
    """A results document this version can read, or a clear error."""
    from anonrisk.errors import DataError

    if doc.get("schema") != SCHEMA or doc.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"results document has schema {doc.get('schema')!r} v{doc.get('schema_version')}; "
                        f"this anonrisk reads {SCHEMA} v{SCHEMA_VERSION} (rerun `anonrisk report` to rewrite it)")
    return doc


def markdown_table(results: dict[str, Any]) -> str:
    """Overview: top-1 of every attack against every anonymizer on the main protocol, the worst case, leakage and utility."""
    from anonrisk.report.card import fmt, fmt_psnr, protocol_keys, ran, worst_case

    attacks = list(dict.fromkeys(a for card in results.values() for a in card["attacks"]))
    keys = protocol_keys(results)
    key = MAIN if MAIN in keys else keys[0]
    head = ["anonymizer"] + [f"{a}" for a in attacks] + ["worst case", "edge SSIM", "SSIM", "PSNR"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    chance = None
    for name, card in results.items():
        cells = [name]
        for a in attacks:
            r = card["attacks"].get(a, {})
            cells.append(fmt(r["protocols"][key]["top1"]) if a in ran(card) and key in r["protocols"] else "skipped" if "skipped" in r else "-")
        w = worst_case(card, key)
        chance = chance or (w and w["metric"]["chance"])
        cells.append(f"{w['attack']}: {w['metric']['normalized']:.3f} norm." if w else "-")
        leak, util = card.get("leakage", {}), card.get("utility", {})
        cells += [f"{leak['edge_ssim']:.2f}" if leak else "-", f"{util['ssim']:.3f}" if util else "-", fmt_psnr(util)]
        rows.append("| " + " | ".join(cells) + " |")
    note = f"\nTop-1 on {key}; chance top-1 = {chance:.3f}. Brackets: 95 % bootstrap interval by identity.\n" if chance else "\n"
    return "\n".join(rows) + "\n" + note


def data_notes(data: dict[str, Any]) -> str:
    """What the report must say about the data: no identity labels (linkage only), photos without a face."""
    notes = []
    if data.get("labeled") is False:
        notes.append("The dataset has no identity labels (every image its own identity): only linkage was measured "
                     "(full-ref/linkage: is an anonymized face linked to its own original?); cross-image re-identification "
                     "(exclude-source) needs identities.")
    if data.get("no_face"):
        notes.append(f"No face was found in {len(data['no_face'])} photos, left out: {', '.join(data['no_face'][:10])}"
                     + (" ..." if len(data["no_face"]) > 10 else "") + ".")
    return "".join(f"{n}\n\n" for n in notes)


def report_markdown(cfg: RunConfig, results: dict[str, Any], data: dict[str, Any] | None = None) -> str:
    from anonrisk.report.card import card_markdown, protocol_keys

    keys = protocol_keys(results)
    attacks = ", ".join(f"{a.name} ({a.kind})" for a in cfg.attacks)
    trained = any("train" in a.get("fingerprints", {}) for card in results.values() for a in card["attacks"].values())
    settings = (f" Trained attacks start from: {cfg.train.backbone}, batch {cfg.train.batch_size}, {cfg.train.steps} steps, "
                f"input {cfg.train.input} (per-attack params override).") if trained else ""
    parts = [
        f"# anonrisk report: {cfg.name}\n",
        f"Attacks: {attacks}.{settings} Dataset: {cfg.data.dataset}.\n",
        data_notes(data or {}),
        markdown_table(results),
        "Leaderboard across anonymizers: [leaderboard.md](leaderboard.md).\n",
        "![re-identification by attack](plots/reid.png)\n\n![privacy vs utility](plots/privacy_utility.png)\n\n"
        "![leakage vs re-identification](plots/leakage_vs_reid.png)\n",
        "## Report cards\n",
    ]
    for name, card in results.items():
        parts.append(card_markdown(name, card, keys))
        parts.append(f"![{name}](plots/{card_plot_name(name)})\n")
        if cfg.tracking.samples:
            parts.append(f"![{name}: samples](plots/{sample_plot_name(name)})\n")
    return "\n".join(parts)


#: what a train stage's DONE says about how it ran
TRAIN_RUNTIME_KEYS = ("engine", "device", "precision", "world_size", "zero_stage", "grad_cache_chunk", "seconds", "made_by")


def _done(runs_dir: str, stage: str, fp: str | None) -> dict:
    path = Path(runs_dir, stage, fp, "DONE") if fp else None
    return read_json(path) if path is not None and path.exists() else {}


def stage_runtime(runs_dir: str, results: dict[str, Any]) -> dict[str, Any]:
    """How each anonymizer's stages really ran, read from their DONE summaries: the anonymize stage's
    workers (device, dtype, attention backend) and every trained attack's engine, device and precision."""
    out = {}
    for name, card in results.items():
        anon = _done(runs_dir, "anonymize", card.get("fingerprints", {}).get("anonymize"))
        entry: dict[str, Any] = {"anonymize": {"runtime": anon.get("runtime", []), "runner": anon.get("runner"), "made_by": anon.get("made_by")}}
        for attack, result in card.get("attacks", {}).items():
            train = _done(runs_dir, "train", result.get("fingerprints", {}).get("train"))
            if train:
                entry.setdefault("train", {})[attack] = {k: train[k] for k in TRAIN_RUNTIME_KEYS if k in train}
        out[name] = entry
    return out


def write_report(cfg: RunConfig, data_stage: StageDir, results: dict[str, Any], anonymized: dict[str, StageDir] | None = None) -> dict:
    """``anonymized``: each anonymizer's anonymize stage, for its samples grid."""
    from anonrisk.environment import environment

    out = Path(cfg.results_dir) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    data_done = read_json(data_stage / "DONE")
    made_by = data_done.pop("made_by", None)
    doc = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "run": cfg.name,
        "anonrisk_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment({"prepare": {"made_by": made_by}, "anonymizers": stage_runtime(cfg.runs_dir, results)}),
        "data": {"fingerprint": data_stage.fingerprint, **data_done},
        "config": cfg.model_dump(mode="json"),
        "results": results,
    }
    previous = out / "metrics.json"
    if previous.exists():
        old = read_json(previous)
        if old.get("results") == doc["results"] and old.get("config") == doc["config"]:
            # nothing changed: keep the file byte-identical (the stages' own made_by say what made them)
            doc["created"] = old["created"]
            doc["environment"] = old.get("environment", doc["environment"])
    write_json(out / "metrics.json", doc)
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    table = markdown_table(results)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(report_markdown(cfg, results, doc["data"]))
    from anonrisk.report.card import leaderboard, leaderboard_markdown
    from anonrisk.report.plots import plot_card, plot_leakage_vs_reid, plot_privacy_utility, plot_reid

    board = leaderboard(results)
    write_json(out / "leaderboard.json", {"schema": "anonrisk.leaderboard", "schema_version": 1, "run": cfg.name,
                                          "protocol": MAIN, "rows": board})
    with atomic_path(out / "leaderboard.md") as tmp:
        tmp.write_text(f"# anonrisk leaderboard: {cfg.name}\n\n{leaderboard_markdown(board)}")
    plot_reid(results, out / "plots" / "reid.png")
    plot_privacy_utility(results, out / "plots" / "privacy_utility.png")
    plot_leakage_vs_reid(results, out / "plots" / "leakage_vs_reid.png")
    for name, card in results.items():
        plot_card(name, card, out / "plots" / card_plot_name(name))
        if anonymized and name in anonymized:
            write_samples(cfg, data_stage, name, anonymized[name], out / "plots" / sample_plot_name(name))
    doc["table"] = table
    doc["results_dir"] = str(out)
    return doc
