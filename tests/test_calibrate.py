"""Budget calibration: per-layer offsets reach the FLOPs target, follow the target's per-layer shape,
round-trip through checkpoints, change what eval measures, and bad input is refused (exit 2)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import ftwt_cli.cli.calibrate  # noqa: F401 - registers the commands on the app
import ftwt_cli.cli.evaluate  # noqa: F401
import ftwt_cli.cli.train  # noqa: F401
from ftwt_cli.algorithms.calibration import CalibrationError, calibrate, clear, is_calibrated
from ftwt_cli.core.flops import FlopsCounter
from ftwt_cli.core.gating import FTWTModel
from ftwt_cli.core.heads import HeadSpec
from ftwt_cli.io import loading
from ftwt_cli.io.checkpoint import load_checkpoint
from ftwt_cli.io.config import resolve
from ftwt_cli.io.data import make_loader
from ftwt_cli.models import create_model


@pytest.fixture(scope="module")
def quickstart():
    """The shipped, trained dense SmallNet with fresh (untrained) heads, and synthetic training images."""
    cfg = resolve("quickstart", samples=192)
    torch.manual_seed(0)
    dense = loading.load_model(cfg, cfg.checkpoint, require="dense").model
    model = FTWTModel(dense, (32, 32), head=HeadSpec(norm=False))
    batches = [images for images, _ in make_loader(loading.dataset(cfg, "train"), 64)]
    return model, batches


def measured(model: FTWTModel, batches) -> float:
    counter = FlopsCounter(model.graph)
    model.eval().configure(mask_source="predicted", record=True)
    with torch.no_grad():
        macs = [counter.macs_from_masks([r.mask > 0 for r in (model(b), model.records())[1]]) for b in batches]
    return float(counter.reduction_pct(torch.cat(macs).mean().item(), with_heads=True))


@pytest.mark.parametrize("target", [25.0, 50.0])
def test_calibration_reaches_the_target_within_half_a_point(quickstart, target):
    model, batches = quickstart
    result = calibrate(model, batches, torch.device("cpu"), target, show=_silent)
    assert result.converged and abs(result.reached_pct - target) <= 0.5
    assert abs(measured(model, batches) - target) <= 0.5  # measured independently of calibrate's own count
    assert is_calibrated(model)
    # the per-layer shape follows the ground truth at r': each layer's keep rate matches its target rate
    for want, got in zip(result.layer_keep_target, result.layer_keep_reached):
        assert abs(want - got) <= 0.05
    clear(model)
    assert not is_calibrated(model)


def test_calibration_refuses_dense_models_and_targets_out_of_range(quickstart):
    model, batches = quickstart
    with pytest.raises(CalibrationError, match="dense"):
        calibrate(create_model("smallnet", 10), batches, torch.device("cpu"), 50.0)
    for bad in (0.0, 100.0, -5.0):
        with pytest.raises(CalibrationError, match=r"\(0, 100\)"):
            calibrate(model, batches, torch.device("cpu"), bad)


def _silent(description, total):
    import contextlib

    return contextlib.nullcontext(lambda *args, **kwargs: None)


# --- through the CLI ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A dense smoke run, and an FTWT run trained for a FLOPs target (calibrated at the end)."""
    from typer.testing import CliRunner

    from ftwt_cli.cli import app

    root = tmp_path_factory.mktemp("runs")
    runner = CliRunner()
    invoke = lambda *args: runner.invoke(app, [str(a) for a in args])  # noqa: E731
    dense = invoke("train", "--profile", "smoke", "--dense", "--epochs", "2", "--out", root / "dense")
    assert dense.exit_code == 0, dense.stderr
    ftwt = invoke(
        "train", "--profile", "smoke", "--init", root / "dense" / "best.pt", "--target-flops", "40", "--epochs", "2",
        "--head-pool", "avg", "--head-norm", "--out", root / "ftwt", "--json",
    )  # fmt: skip
    assert ftwt.exit_code == 0, ftwt.stderr
    return root, json.loads(ftwt.stdout)


def test_target_flops_training_is_calibrated_and_eval_measures_the_offsets(runs, run_cli):
    root, summary = runs
    record = summary["calibration"]
    assert record["split"] == "val" and summary["selected_on"] == "val"
    assert abs(record["reached_pct"] - 40.0) <= 0.5  # on the held-out training images
    best = load_checkpoint(root / "ftwt" / "best.pt")
    assert best["meta"]["calibration"]["target_pct"] == 40.0
    offsets = [v for k, v in best["model"].items() if k.endswith("logit_offset")]
    assert offsets and any(bool(o.abs().max() > 0) for o in offsets)
    # eval of best.pt measures the calibrated masks, so it reports the calibrated test reduction
    result = run_cli("eval", "--profile", "smoke", "--checkpoint", root / "ftwt" / "best.pt", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)["models"][0]
    assert report["flops_reduction_with_heads_pct"] == pytest.approx(record["test_reduction_calibrated_pct"], abs=1e-6)
    assert report["estimate"]["calibrated"] and report["estimate"]["target"] == 40.0
    assert report["head_pool"] == "avg" and report["head_norm"] is True
    assert "avg-pool" in report["label"] and "head-norm" in report["label"] and "calibrated" in report["label"]
    layers = pd.read_csv(root / "ftwt" / "layers.csv")
    assert {"train", "val", "test", "best-raw", "best-calibrated"} <= set(layers["split"])
    assert {"target_keep_ratio", "keep_ratio", "precision", "recall", "head_bce", "clusters"} <= set(layers.columns)
    config = json.loads((root / "ftwt" / "config.json").read_text())["config"]
    assert config["head_pool"] == "avg" and config["head_norm"] is True


def test_calibrate_command_writes_a_new_checkpoint_that_eval_measures(runs, run_cli, tmp_path):
    root, _ = runs
    raw = root / "ftwt" / "last.pt"  # last.pt keeps the raw heads
    reached = {}
    for target in (20, 60):
        out = tmp_path / f"cal{target}.pt"
        result = run_cli("calibrate", raw, "--profile", "smoke", "--target-flops", target, "--out", out, "--json")
        assert result.exit_code == 0, result.stderr
        doc = json.loads(result.stdout)
        assert abs(doc["reached_pct"] - target) <= 0.5 and doc["split"] == "val"
        assert {"test_top1_raw", "test_top1_trained", "test_top1_calibrated"} <= set(doc)
        evaluated = run_cli("eval", "--profile", "smoke", "--checkpoint", out, "--json")
        reached[target] = json.loads(evaluated.stdout)["models"][0]["flops_reduction_with_heads_pct"]
        assert reached[target] == pytest.approx(doc["test_reduction_calibrated_pct"], abs=1e-6)
    assert reached[60] > reached[20] + 20


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target-flops", "0"], "(0, 100)"),
        (["--target-flops", "100"], "(0, 100)"),
        (["--target-flops", "-3"], "(0, 100)"),
    ],
)
def test_calibrate_rejects_targets_out_of_range(runs, run_cli, args, message):
    root, _ = runs
    result = run_cli("calibrate", root / "ftwt" / "last.pt", "--profile", "smoke", *args)
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_calibrating_a_dense_checkpoint_is_a_clear_error(runs, run_cli, tmp_path):
    root, _ = runs
    out = tmp_path / "never.pt"
    result = run_cli("calibrate", root / "dense" / "best.pt", "--profile", "smoke", "--target-flops", "50", "--out", out)
    assert result.exit_code == 2 and "dense" in result.stderr and not out.exists()


@pytest.mark.parametrize("target", ["0", "100", "250"])
def test_train_rejects_targets_out_of_range(run_cli, runs, target, tmp_path):
    root, _ = runs
    result = run_cli("train", "--profile", "smoke", "--init", root / "dense" / "best.pt", "--target-flops", target, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "(0, 100)" in result.stderr and not (tmp_path / "x").exists()


def test_no_calibrate_keeps_the_raw_heads(runs, run_cli, tmp_path):
    root, _ = runs
    result = run_cli(
        "train", "--profile", "smoke", "--init", root / "dense" / "best.pt", "--target-flops", "40", "--epochs", "1",
        "--no-calibrate", "--out", tmp_path / "raw", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["calibration"] is None
    assert "calibration" not in load_checkpoint(tmp_path / "raw" / "best.pt")["meta"]


def test_budgeted_runs_calibrate_when_heads_freeze_so_the_backbone_fine_tunes_under_final_masks(runs):
    root, summary = runs
    last = load_checkpoint(root / "ftwt" / "last.pt")  # heads as trained: calibrated at the freeze epoch
    offsets = [v for k, v in last["model"].items() if k.endswith("logit_offset")]
    assert any(bool(o.abs().max() > 0) for o in offsets)
    record = summary["calibration"]
    assert record["calibrated_at_freeze"] is True
    assert record["best_epoch"] == 2  # smoke: 2 epochs, heads freeze at epoch 2; earlier epochs are off budget
    assert {"test_top1_raw", "test_top1_trained", "test_top1_calibrated", "test_reduction_trained_pct"} <= set(record)


def test_observed_masks_are_recorded_but_not_applied(quickstart):
    model, batches = quickstart
    model.eval().configure(mask_source="predicted", record=True)
    clear(model)
    with torch.no_grad():
        masked = model(batches[0])
        model.configure(mask_source="observed")
        observed = model(batches[0])
        masks = [r.mask for r in model.records()]
        model.configure(mask_source="dense")
        dense = model(batches[0])
    assert torch.equal(observed, dense) and not torch.equal(masked, dense)
    assert all(m is not None and m.shape[1] == b.conv.out_channels for m, b in zip(masks, model.blocks))


def test_head_warmup_trains_only_the_heads(run_cli, runs, tmp_path):
    root, _ = runs
    result = run_cli(
        "train", "--profile", "smoke", "--init", root / "dense" / "best.pt", "--r", "0.9", "--epochs", "1",
        "--head-warmup", "1", "--lr", "1e-12", "--out", tmp_path / "w",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    dense = load_checkpoint(root / "dense" / "best.pt")["model"]
    warm = load_checkpoint(tmp_path / "w" / "last.pt")["model"]
    conv = next(k for k in dense if k.endswith("weight") and dense[k].dim() == 4)
    gated = "backbone." + conv.removesuffix(".weight") + ".conv.weight"  # the conv inside its GatedBlock
    torch.testing.assert_close(warm[gated], dense[conv], atol=1e-6, rtol=0)  # lr ≈ 0: the backbone did not move
    assert json.loads((tmp_path / "w" / "config.json").read_text())["config"]["head_warmup"] == 1
    bad = run_cli("train", "--profile", "smoke", "--init", root / "dense" / "best.pt", "--head-warmup", "-1", "--out", tmp_path / "b")
    assert bad.exit_code == 2 and "--head-warmup" in bad.stderr
