"""estimate and search give one r for one budget (issue #26): estimate with --target-flops runs search's
bisection on its own single pass."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("target", ["30", "45"])
def test_estimate_and_search_choose_the_same_r(cli_json, target):
    est = cli_json("estimate", "--profile", "smoke", "--target-flops", target)
    found = cli_json("search", "--profile", "smoke", "--target-flops", target)
    assert est["chosen_r"] == found["chosen_r"]
    assert est["chosen_reduction_pct"] == pytest.approx(found["estimated_reduction_pct"], abs=1e-9)
    assert est["nearest_table_r"] in [row["r"] for row in est["estimates"]]  # the table's own row, named apart
    assert [row["r"] for row in est["estimates"]] == pytest.approx([0.8, 0.85, 0.9, 0.95, 1.0])  # the table is unchanged


def test_estimate_says_both_rs(run_cli):
    result = run_cli("estimate", "--profile", "smoke", "--target-flops", "30")
    assert result.exit_code == 0, result.stderr
    assert "as 'ftwt search' bisects" in result.stderr and "nearest row of the table" in result.stderr


def test_estimate_says_why_when_search_would_refuse_the_budget(run_cli):
    result = run_cli("estimate", "--profile", "smoke", "--target-flops", "10")
    assert result.exit_code == 0, result.stderr
    assert "outside the reachable range" in result.stderr
