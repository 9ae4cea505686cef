"""--val-fraction: a seeded validation split carved from the training images chooses best.pt."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from torch.utils.data import Subset
from typer.testing import CliRunner

from ftwt_cli.io import loading
from ftwt_cli.io.config import resolve


def test_split_is_seeded_disjoint_and_complete():
    kept, held = loading.holdout_indices(1000, 0.1, seed=3)
    assert len(held) == 100 and len(kept) == 900
    assert sorted(kept + held) == list(range(1000))
    assert loading.holdout_indices(1000, 0.1, seed=3) == (kept, held)
    assert loading.holdout_indices(1000, 0.1, seed=4)[1] != held


def _base_indices(ds) -> list[int]:
    """Indices into the underlying training split of a (nested) Subset."""
    indices = list(range(len(ds)))
    while isinstance(ds, Subset):
        indices = [ds.indices[i] for i in indices]
        ds = ds.dataset
    return indices


def test_training_splits_hold_out_unaugmented_training_images():
    cfg = resolve("smoke", val_fraction=0.2, train_samples=0, test_samples=0)
    train, val = loading.training_splits(cfg)
    assert len(val) == 1000 and len(train) == 4000  # of the synthetic set's 5,000 training images
    assert not set(_base_indices(train)) & set(_base_indices(val))
    # validation images are plain training images (no crop/flip): identical on every read
    assert torch.equal(val[0][0], val[0][0])
    plain = loading.dataset(cfg, "train", cap=False)
    assert torch.equal(val[0][0], plain[_base_indices(val)[0]][0])
    capped_train, capped_val = loading.training_splits(resolve("smoke", val_fraction=0.2))  # train_samples = 256
    assert len(capped_train) == 205 and len(capped_val) == 51
    assert not set(_base_indices(capped_train)) & set(_base_indices(capped_val))
    assert loading.training_splits(resolve("smoke", val_fraction=0.0))[1] is None


@pytest.mark.parametrize("fraction", [0.1, 0.0])
def test_best_checkpoint_is_chosen_on_the_recorded_split(tmp_path, monkeypatch, fraction):
    import ftwt_cli.cli.train  # noqa: F401
    from ftwt_cli.cli import app

    monkeypatch.chdir(tmp_path)
    args = ["train", "--profile", "smoke", "--dense", "--epochs", "3", "--out", "run", "--json"]
    result = CliRunner().invoke(app, [*args, "--val-fraction", str(fraction)])
    assert result.exit_code == 0, result.output
    split = "val" if fraction else "test"
    summary = json.loads(result.stdout)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["meta"]
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert summary["selected_on"] == config["best_selected_on"] == best["best_selected_on"] == split
    assert config["config"]["val_fraction"] == fraction
    assert ("val_top1" in metrics.columns) == bool(fraction)
    assert summary["best_top1"] == pytest.approx(metrics[f"{split}_top1"].max())
    assert best["epoch"] == int(metrics.loc[metrics[f"{split}_top1"].idxmax(), "epoch"])
    assert f"best {split} top-1" in result.stderr


def test_calibrated_best_checkpoint_keeps_the_selection_record(tmp_path, monkeypatch):
    """--target-flops rewrites best.pt after calibration; the record of which split chose it stays."""
    import ftwt_cli.cli.train  # noqa: F401
    from ftwt_cli.cli import app

    monkeypatch.chdir(tmp_path)
    dense = CliRunner().invoke(app, ["train", "--profile", "smoke", "--dense", "--epochs", "1", "--out", "dense", "--json"])
    assert dense.exit_code == 0, dense.output
    args = ["train", "--profile", "smoke", "--init", "dense/best.pt", "--target-flops", "40", "--epochs", "1", "--out", "ftwt"]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    meta = torch.load(tmp_path / "ftwt" / "best.pt", weights_only=True)["meta"]
    assert "calibration" in meta and meta["best_selected_on"] == "val"
