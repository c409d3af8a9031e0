"""The report card of each anonymizer and the leaderboard across anonymizers (pure functions of results).

A report card holds every attack x protocol with intervals, chance-normalized; a privacy claim rests on the
strongest attack, so the ``worst case`` per protocol is the attack with the highest top-1 and the
leaderboard ranks anonymizers by it (lower = more private), beside leakage and utility.
"""

from __future__ import annotations

from typing import Any

MAIN = "full-ref/exclude-source"
ORDER = {"full-ref": 0, "few-ref": 1, "single-ref": 2, "exclude-source": 0, "linkage": 1}


def protocol_keys(results: dict[str, Any]) -> list[str]:
    keys = {k for card in results.values() for a in ran(card).values() for k in a["protocols"]}
    return sorted(keys, key=lambda k: tuple(ORDER.get(part, 9) for part in k.split("/")))


def ran(card: dict[str, Any]) -> dict[str, Any]:
    """The attacks of a card that produced numbers (skipped ones have a reason instead)."""
    return {name: a for name, a in card.get("attacks", {}).items() if "protocols" in a}


def worst_case(card: dict[str, Any], key: str = MAIN, metric: str = "top1") -> dict[str, Any] | None:
    """The strongest attack on one protocol: its name and metric (with interval and chance)."""
    best = None
    for name, a in ran(card).items():
        m = a["protocols"].get(key)
        if m and (best is None or m[metric]["value"] > best["metric"]["value"]):
            best = {"attack": name, "metric": m[metric]}
    return best


def fmt(v: dict | None) -> str:
    if not v:
        return "-"
    lo, hi = v["ci95"]
    return f"{v['value']:.3f} [{lo:.2f}, {hi:.2f}]" if lo == lo else f"{v['value']:.3f}"


def _num(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def fmt_psnr(util: dict | None, unit: str = "") -> str:
    """PSNR as every table shows it: the mean over differing pairs, "identical" when every pair is
    pixel-identical (``psnr`` null in JSON), with the count of identical pairs when only some are."""
    if not util or "psnr" not in util:
        return "-"
    n_same = util.get("identical_pairs", 0)
    if util["psnr"] is None:
        return "identical"
    text = f"{util['psnr']:.1f}{unit}"
    return f"{text} ({n_same} identical)" if n_same else text


def leaderboard(results: dict[str, Any], key: str = MAIN) -> list[dict[str, Any]]:
    """Anonymizers ranked by the worst case over attacks (chance-normalized top-1 on ``key``), most private first."""
    rows = []
    for name, card in results.items():
        w = worst_case(card, key)
        util = card.get("utility", {})
        rows.append({
            "anonymizer": name,
            "worst_attack": w["attack"] if w else None,
            "worst_top1": w["metric"]["value"] if w else None,
            "worst_top1_ci95": w["metric"]["ci95"] if w else None,
            "worst_top1_normalized": w["metric"]["normalized"] if w else None,
            "chance": w["metric"]["chance"] if w else None,
            "top1_by_attack": {a: r["protocols"][key]["top1"]["value"] for a, r in ran(card).items() if key in r["protocols"]},
            "skipped_attacks": {a: r["skipped"] for a, r in card.get("attacks", {}).items() if "skipped" in r},
            "verbatim_face": card.get("verbatim", {}).get("face", {}).get("mean"),
            "worst_tar": _first_tar(card["attacks"][w["attack"]]) if w else None,
            "edge_ssim": card.get("leakage", {}).get("edge_ssim"),
            "edge_f": card.get("leakage", {}).get("edge_f"),
            **{m: util.get(m) for m in ("ssim", "psnr", "identical_pairs", "lpips", "fid", "kid", "fid_features")},
        })
    rows.sort(key=lambda r: (r["worst_top1_normalized"] is None, r["worst_top1_normalized"] if r["worst_top1_normalized"] is not None else 0))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def _main_of(by_key: dict[str, Any], main: str) -> tuple[str, Any]:
    """(key, value) of ``main`` if measured, else of the first key measured (linkage only: no labels)."""
    if main in by_key:
        return main, by_key[main]
    return next(iter(by_key.items()), (main, None))


def _first_tar(attack: dict[str, Any]) -> dict[str, Any] | None:
    """The attack's TAR at the first configured FAR in its main verification mode (with its interval)."""
    tars = (_main_of(attack.get("verification", {}), MAIN.split("/")[1])[1] or {}).get("tar_at_far", {})
    return next(iter(tars.values()), None)


def privacy_lines(card: dict[str, Any]) -> list[str]:
    """The verification, anonymity-set and verbatim-copy lines of a report card."""
    out = []
    for a_name, a in ran(card).items():
        mode, ver = _main_of(a.get("verification", {}), MAIN.split("/")[1])
        key, anon = _main_of(a.get("anonymity", {}), MAIN)
        if ver:
            tars = ", ".join(f"TAR@FAR={t['far']:g} {fmt(t)}" + ("" if t["resolved"] else " (unresolved: too few impostor pairs)")
                             for t in ver["tar_at_far"].values())
            out.append(f"- {a_name}, 1:1 verification ({mode}): {tars}; EER {ver['eer']:.3f} "
                       f"({ver['n_genuine']} genuine, {ver['n_impostor']} impostor pairs)")
        if anon:
            out.append(f"- {a_name}, effective anonymity set ({key}, pool {anon['pool']}): entropy {anon['entropy_set']['mean']:.1f}, "
                       f"rank {anon['rank_set']['mean']:.1f} (median {anon['rank_set']['q50']:.0f})")
    verb = card.get("verbatim")
    if verb:
        out.append(f"- verbatim copy: {verb['image']['mean']:.3f} of the pixels, {verb['face']['mean']:.3f} of the face region "
                   f"unchanged; {verb['pasted_faces']:.2f} of the images with the face pasted as it was ({verb['n_pairs']} pairs)")
    return out


def leaderboard_markdown(rows: list[dict[str, Any]], key: str = MAIN) -> str:
    attacks = list(dict.fromkeys(a for r in rows for a in r["top1_by_attack"]))
    optional = [m for m in ("lpips", "fid", "kid") if any(r[m] is not None for r in rows)]
    head = ["rank", "anonymizer", "worst-case top-1", "norm.", "strongest attack"] + [f"{a}" for a in attacks]
    head += ["TAR@FAR", "verbatim face", "edge SSIM", "SSIM", "PSNR"] + [m.upper() for m in optional]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        w = {"value": r["worst_top1"], "ci95": r["worst_top1_ci95"]} if r["worst_top1"] is not None else None
        cells = [str(r["rank"]), r["anonymizer"], fmt(w), _num(r["worst_top1_normalized"], ".3f"), r["worst_attack"] or "-"]
        cells += [_num(r["top1_by_attack"].get(a), ".3f") for a in attacks]
        tar = r.get("worst_tar")
        cells += [f"{fmt(tar)} @{tar['far']:g}" if tar else "-", _num(r.get("verbatim_face"), ".2f")]
        cells += [_num(r["edge_ssim"], ".2f"), _num(r["ssim"], ".3f"), fmt_psnr(r)] + [_num(r[m], ".4g") for m in optional]
        lines.append("| " + " | ".join(cells) + " |")
    chance = next((r["chance"] for r in rows if r["chance"] is not None), None)
    skipped = {a: reason for r in rows for a, reason in r["skipped_attacks"].items()}
    for a, reason in skipped.items():
        lines.append(f"\nSkipped attack {a}: {reason}")
    note = (f"\nRanked by the strongest attack's chance-normalized top-1 on {key} (lower = more private); "
            f"chance top-1 = {_num(chance, '.3f')}; brackets: 95 % bootstrap interval by identity.\n")
    return "\n".join(lines) + "\n" + note


def card_markdown(name: str, card: dict[str, Any], keys: list[str]) -> str:
    """One anonymizer's report card: attack x protocol (top-1 with interval, normalized), leakage, utility."""
    out = [f"### {name}\n"]
    head = ["attack", "threat model"] + keys
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a_name, a in card.get("attacks", {}).items():
        if "skipped" in a:
            out.append("| " + " | ".join([a_name, f"skipped: {a['skipped']}"] + ["-"] * len(keys)) + " |")
            continue
        cells = [a_name, a.get("threat", "")]
        for k in keys:
            m = a["protocols"].get(k)
            cells.append(f"{fmt(m['top1'])} (norm. {m['top1']['normalized']:.2f})" if m else "-")
        out.append("| " + " | ".join(cells) + " |")
    w = worst_case(card)
    if w:
        out.append(f"\nWorst case ({MAIN}): **{w['attack']}**, top-1 {fmt(w['metric'])}, "
                   f"{w['metric']['value'] / w['metric']['chance']:.1f}x chance.")
    leak = card.get("leakage")
    if leak:
        out.append(f"\nLeakage (edges of original vs anonymized): F-score {leak['edge_f']:.3f}, Chamfer {leak['chamfer']:.2f} px, "
                   f"edge SSIM {leak['edge_ssim']:.3f} over {leak['n_pairs']} pairs.")
    privacy = privacy_lines(card)
    if privacy:
        out.append("\nPrivacy measures:\n" + "\n".join(privacy))
    util = card.get("utility")
    if util:
        parts = [f"SSIM {util['ssim']:.3f}", f"PSNR {fmt_psnr(util, ' dB')}"]
        parts += [f"{m.upper()} {util[m]:.4g}" for m in ("lpips", "fid", "kid") if m in util]
        if util.get("fid_features") and util["fid_features"] != "fid-inception":
            parts.append(f"FID/KID on {util['fid_features']} features (not the paper FID)")
        out.append(f"\nUtility: {', '.join(parts)}.")
        by_reason: dict[str, list[str]] = {}
        for m, reason in util.get("skipped", {}).items():
            by_reason.setdefault(reason, []).append(m.upper())
        for reason, metrics in by_reason.items():
            out.append(f"- {', '.join(metrics)} skipped: {reason}")
    return "\n".join(out) + "\n"
