"""``anonrisk audit ORIGINALS ANONYMIZED``: a privacy report for a pair of folders, no config needed.

The anonymized folder is read as a ``precomputed`` anonymizer of the originals (pairs matched by relative
path, any image extension; originals without an output are left out and counted). The originals are an
``unlabeled`` dataset (every image its own identity: linkage only) or, with ``labels="folders"``, a
``folder`` dataset (``<identity>/<image>``: every protocol). All identities but one are test identities.
It runs the training-free attacks (``edge``; ``recognizer`` when its package and weights are there), the
verification and anonymity measures, the verbatim-copy audit, leakage and utility (LPIPS/FID only from
local weights), and writes the usual report plus ``audit.md``, a short summary that lists what could not run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from anonrisk.errors import DataError

ATTACKS = ("edge", "recognizer")


def identities_in(originals: Path, labels: str) -> int:
    """How many identities the originals hold (to put all but one into the test split)."""
    from anonrisk.data.unlabeled import image_tree

    found = image_tree(originals)
    if labels == "none":
        return len(found)
    per: dict[str, int] = {}
    for rel, _ in found:
        if "/" in rel:
            per[rel.split("/")[0]] = per.get(rel.split("/")[0], 0) + 1
    return sum(n >= 2 for n in per.values())


def audit_config(originals: Path, anonymized: Path, out: Path, labels: str = "none", image_size: int = 112,
                 attacks: tuple[str, ...] = ATTACKS, bootstrap: int = 1000) -> dict[str, Any]:
    n = identities_in(originals, labels)
    if n < 3:
        raise DataError(f"audit: {originals} holds {n} {'images' if labels == 'none' else 'identities with 2+ images'}; need at least 3")
    return {
        "name": out.name, "runs_dir": str(out / "runs"), "results_dir": str(out.parent), "progress": False,
        "data": {"dataset": "unlabeled" if labels == "none" else "folder", "root": str(originals), "image_size": image_size,
                 "on_bad_image": "quarantine", "split": {"test_fraction": (n - 1 - 0.4) / n}},
        "anonymizers": [{"name": "anonymized", "kind": "precomputed", "params": {"root": str(anonymized)}}],
        "attacks": [{"name": a, "kind": a} for a in attacks],
        "evaluate": {"bootstrap": bootstrap}, "tracking": {"mlflow": False},
    }


def audit_summary(doc: dict[str, Any], quarantined: int, out: Path) -> str:
    """The short summary: pairs, each attack's linkage with its interval, the privacy measures, what did not run."""
    from anonrisk.report.card import fmt, fmt_psnr

    card = doc["results"]["anonymized"]
    lines = [f"# anonrisk audit: {out.name}\n", f"Pairs scored: {card.get('verbatim', {}).get('n_pairs', '?')} test pairs"
             + (f"; {quarantined} originals had no usable anonymized image (left out, listed in the anonymize stage's quarantine.json)"
                if quarantined else "") + ".\n"]
    missing = []
    for name, a in card["attacks"].items():
        if "skipped" in a:
            missing.append(f"attack {name}: {a['skipped']}")
            continue
        for key, m in a["protocols"].items():
            t = m["top1"]
            lines.append(f"- {name} {key}: top-1 {fmt(t)}, chance {t['chance']:.3f} ({t['value'] / t['chance']:.1f}x chance)")
        for mode, v in a.get("verification", {}).items():
            tars = ", ".join(f"TAR@FAR={x['far']:g} {fmt(x)}" for x in v["tar_at_far"].values())
            lines.append(f"- {name} verification ({mode}): {tars}; EER {v['eer']:.3f}")
    verb, leak, util = card.get("verbatim"), card.get("leakage"), card.get("utility", {})
    if verb:
        lines.append(f"- verbatim copy: {verb['face']['mean']:.3f} of the face region unchanged ({verb['pasted_faces']:.2f} of images pasted)")
    if leak:
        lines.append(f"- edge leakage: edge SSIM {leak['edge_ssim']:.3f}, F-score {leak['edge_f']:.3f}")
    if util:
        lines.append(f"- utility: SSIM {util['ssim']:.3f}, PSNR {fmt_psnr(util, ' dB')}")
    missing += [f"{m.upper()}: {why}" for m, why in util.get("skipped", {}).items()]
    if doc["data"].get("labeled") is False:
        missing.append("cross-image re-identification (exclude-source): the originals carry no identity labels "
                       "(use --labels folders for <identity>/<image> trees)")
    missing.append("trained attacks (contrastive, surrogate): an audit trains nothing; run a config for them")
    lines.append("\nNot run:\n" + "\n".join(f"- {m}" for m in missing))
    lines.append(f"\nFull report: {out / 'report.md'}; numbers: {out / 'metrics.json'}.")
    return "\n".join(lines) + "\n"


def run_audit(originals: str, anonymized: str, out: Optional[str] = None, labels: str = "none", image_size: int = 112,
              attacks: tuple[str, ...] = ATTACKS, bootstrap: int = 1000) -> tuple[str, Path]:
    from anonrisk.anonymize.runner import quarantined
    from anonrisk.config.schema import RunConfig
    from anonrisk.pipeline import Pipeline
    from anonrisk.stages import atomic_path

    orig, anon = Path(originals).expanduser().resolve(), Path(anonymized).expanduser().resolve()
    for what, p in (("ORIGINALS", orig), ("ANONYMIZED", anon)):
        if not p.is_dir():
            raise DataError(f"audit: {what} folder not found: {p}")
    where = Path(out or f"audit-{anon.name}").expanduser().resolve()
    cfg = RunConfig.model_validate(audit_config(orig, anon, where, labels, image_size, attacks, bootstrap))
    pipe = Pipeline(cfg)
    doc = pipe.run()
    text = audit_summary(doc, len(quarantined(pipe.plan.target("anonymized").anonymize.path)), where)
    with atomic_path(where / "audit.md") as tmp:
        tmp.write_text(text)
    return text, where
