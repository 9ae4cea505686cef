"""Recipes follow --epochs: the profile's lr milestones scale with it; the training summary reports best.pt's
test top-1 and epoch beside the last epoch's (issue #26)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from ftwt_cli.io.config import resolve, scale_milestones


@pytest.mark.parametrize(
    "milestones, profile_epochs, epochs, expected",
    [
        ([8, 12], 15, 4, [2, 3]),  # quickstart's dense recipe, 4 epochs: decays at the same fractions
        ([80, 120, 150], 200, 10, [4, 6, 8]),
        ([80, 120, 150], 200, 3, [1, 2]),  # strictly increasing and before the last epoch; the third dropped
        ([8, 12], 15, 1, []),  # one epoch: nothing to decay
        ([6, 8], 10, 20, [12, 16]),  # longer runs stretch them
    ],
)
def test_milestones_scale_as_fractions_of_the_profiles_epochs(milestones, profile_epochs, epochs, expected):
    assert scale_milestones(milestones, profile_epochs, epochs) == expected


def test_resolve_scales_the_profiles_milestones_and_explicit_ones_win():
    assert resolve("quickstart", dense_epochs=4).dense_milestones == [2, 3]
    assert resolve("quickstart", epochs=5).milestones == [3, 4]
    assert resolve("quickstart", dense_epochs=4, dense_milestones=[3]).dense_milestones == [3]
    assert resolve("quickstart").dense_milestones == [8, 12]  # the profile's own epochs: unchanged


def test_training_records_scaled_milestones_and_reports_best_pt(run_cli, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--profile", "quickstart", "--dense", "--epochs", "2", "--samples", "128",
                     "--out", out, "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["dense_milestones"] == [1]  # [8, 12] of 15 epochs → 2 epochs
    summary = json.loads(result.stdout)
    metrics = pd.read_csv(out / "metrics.csv")
    assert summary["best_epoch"] in (1, 2)
    assert summary["best_test_top1"] == pytest.approx(metrics.loc[metrics["epoch"] == summary["best_epoch"], "test_top1"].item())
    assert summary["test_top1"] == pytest.approx(metrics["test_top1"].iloc[-1])  # the last epoch's, kept
    assert metrics["lr"].tolist() == pytest.approx([0.1, 0.01])  # the lr decayed after epoch 1
    assert "best.pt test top-1 (epoch" in result.stderr
