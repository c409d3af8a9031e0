"""Report card and leaderboard as pure functions of results: the worst case over attacks, ranking, skipped
columns with their reason, and the schema check."""

import pytest

from anonrisk.report.card import card_markdown, leaderboard, leaderboard_markdown, worst_case
from anonrisk.report.report import SCHEMA, SCHEMA_VERSION, check_schema, markdown_table

KEY = "full-ref/exclude-source"


def metric(value, chance=0.1):
    return {"value": value, "ci95": [value - 0.05, value + 0.05], "chance": chance, "normalized": (value - chance) / (1 - chance),
            "chance_ci95": [0.05, 0.15]}


def attack(value, threat="t"):
    m = {"top1": metric(value), "top5": metric(min(1, value + 0.2)), "mrr": metric(value), "n_probes": 50, "pool": 10}
    return {"threat": threat, "protocols": {KEY: m, "full-ref/linkage": m}}


def card(**values):
    attacks = {name: attack(v) if v is not None else {"attack": name, "skipped": f"{name}: weights not given"} for name, v in values.items()}
    return {"attacks": attacks, "leakage": {"edge_f": 0.5, "chamfer": 1.0, "edge_ssim": 0.4, "n_pairs": 50},
            "utility": {"ssim": 0.5, "psnr": 20.0, "n_pairs": 50, "skipped": {"lpips": "LPIPS: no weights"}}}


RESULTS = {
    "blur": card(contrastive=0.4, edge=0.6, dlib=None),
    "noise": card(contrastive=0.1, edge=0.12, dlib=None),
    "resynth": card(contrastive=0.3, edge=0.2, dlib=None),
}


def test_worst_case_is_the_strongest_attack_that_ran():
    w = worst_case(RESULTS["blur"])
    assert w["attack"] == "edge" and w["metric"]["value"] == 0.6
    assert worst_case({"attacks": {"dlib": {"skipped": "x"}}}) is None


def test_leaderboard_ranks_by_worst_case_most_private_first():
    rows = leaderboard(RESULTS)
    assert [r["anonymizer"] for r in rows] == ["noise", "resynth", "blur"]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert rows[1]["worst_attack"] == "contrastive" and rows[1]["skipped_attacks"] == {"dlib": "dlib: weights not given"}
    md = leaderboard_markdown(rows)
    assert md.splitlines()[2].startswith("| 1 | noise |") and "LPIPS" not in md  # no column for a metric nobody has


def test_card_states_skipped_attacks_and_metrics_and_keeps_the_rest():
    md = card_markdown("blur", RESULTS["blur"], [KEY, "full-ref/linkage"])
    assert "| dlib | skipped: dlib: weights not given | - | - |" in md
    assert "- LPIPS skipped: LPIPS: no weights" in md
    assert "Worst case (full-ref/exclude-source): **edge**, top-1 0.600 [0.55, 0.65], 6.0x chance." in md
    table = markdown_table(RESULTS)
    assert table.splitlines()[0] == "| anonymizer | contrastive | edge | dlib | worst case | edge SSIM | SSIM | PSNR |"
    assert "| noise | 0.100 [0.05, 0.15] | 0.120 [0.07, 0.17] | skipped | edge: 0.022 norm. |" in table


def test_schema_check_names_both_versions():
    from anonrisk.errors import DataError

    assert check_schema({"schema": SCHEMA, "schema_version": SCHEMA_VERSION})
    with pytest.raises(DataError, match=r"schema 'anonrisk.results' v1; this anonrisk reads anonrisk.results v2"):
        check_schema({"schema": SCHEMA, "schema_version": 1})
