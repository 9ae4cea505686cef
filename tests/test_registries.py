"""Registries are the extension points: a head variant, a target rule, a static method is one registered
class or function, here defined inside this test module (no ftwt_cli file is touched), and the real CLI,
the run records, the eval labels and the sparse engine pick it up from the registry alone."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from ftwt_cli.algorithms import static
from ftwt_cli.cli import app
from ftwt_cli.core.heads import HEADS, DecisionHead
from ftwt_cli.core.targets import TARGETS, TopKTarget
from ftwt_cli.engine import build_engine
from ftwt_cli.io import loading
from ftwt_cli.io.checkpoint import load_checkpoint
from ftwt_cli.io.config import resolve


class RescaledHead(DecisionHead):
    """A toy variant: the pooled input multiplied by its width before the 1×1 conv, no softmax (so the
    logits are not the paper head's affine form and the engine must run the variant's own code)."""

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.proj(pooled * pooled.shape[1]) + self.logit_offset


class HalfTarget(TopKTarget):
    """A toy target rule: keep half the channels, whatever the number given."""

    def __init__(self, value: float) -> None:
        super().__init__(0.5)


def keep_first_filters(dense, target_pct, input_size, batches=None):
    """A toy static method: uniform pruning's widths, recorded under its own name."""
    result = static.uniform(dense, target_pct, input_size)
    result.method = "toy-static"
    return result


@pytest.fixture(scope="module")
def registered():
    HEADS.register("toy-rescaled")(RescaledHead)
    TARGETS.register("toy-half")(HalfTarget)
    static.STATIC_METHODS.register("toy-static")(keep_first_filters)
    yield
    HEADS.unregister("toy-rescaled")
    TARGETS.unregister("toy-half")
    static.STATIC_METHODS.unregister("toy-static")


@pytest.fixture(scope="module")
def cli(registered, cli_json):  # the toy classes are registered first
    return cli_json


@pytest.fixture(scope="module")
def dense(cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("registries") / "dense"
    cli("train", "--profile", "smoke", "--dense", "--epochs", "1", "--out", out)
    return out / "best.pt"


def test_a_head_variant_is_one_class_through_train_eval_and_the_engine(cli, dense, tmp_path):
    run = tmp_path / "toy-head"
    summary = cli("train", "--profile", "smoke", "--init", dense, "--head", "toy-rescaled", "--r", "0.9", "--epochs", "1", "--out", run)
    assert summary["mode"] == "decoupled"
    meta = load_checkpoint(run / "best.pt")["meta"]
    assert meta["head"] == "toy-rescaled"  # the run record names the variant
    assert json.loads((run / "config.json").read_text())["config"]["head"] == "toy-rescaled"

    report = cli("eval", "--profile", "smoke", "--checkpoint", run / "best.pt", "--compare", dense)
    ftwt, baseline = report["models"]
    assert ftwt["head"] == "toy-rescaled" and "toy-rescaled" in ftwt["label"]  # the eval label says so
    assert 0.0 < ftwt["flops_reduction_pct"] < 100.0 and baseline["flops_reduction_pct"] == 0

    loaded = loading.load_model(resolve("smoke"), str(run / "best.pt"), require="ftwt")
    model = loaded.model.eval().configure(mask_source="predicted", record=True)
    assert isinstance(model.heads()[0], RescaledHead) and model.heads()[0].affine() is None
    engine = build_engine(model)
    images = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        for image in images:
            x = image[None]
            expected = model(x)
            masks = [rec.mask[0] > 0 for rec in model.records()]
            torch.testing.assert_close(engine(x), expected, rtol=1e-4, atol=1e-4)
            assert all(torch.equal(a, b) for a, b in zip(engine.block_masks(), masks))


def test_a_target_rule_is_one_class(cli, dense, tmp_path):
    run = tmp_path / "toy-target"
    cli("train", "--profile", "smoke", "--init", dense, "--gt", "toy-half", "--r", "0.9", "--epochs", "1", "--out", run)
    meta = load_checkpoint(run / "best.pt")["meta"]
    assert meta["target"] == "toy-half"
    report = cli("eval", "--profile", "smoke", "--checkpoint", run / "best.pt")
    assert "toy-half" in report["models"][0]["label"]
    assert all(layer["target_keep_ratio"] == pytest.approx(0.5, abs=0.07) for layer in report["models"][0]["layers"])


def test_a_static_method_is_one_function(cli, dense, tmp_path):
    run = tmp_path / "toy-static"
    summary = cli("train", "--profile", "smoke", "--init", dense, "--static", "toy-static", "--target-flops", "30", "--epochs", "1", "--out", run)
    assert summary["mode"] == "static" and abs(summary["flops_reduction_pct"] - 30) <= 1.0
    report = cli("eval", "--profile", "smoke", "--checkpoint", run / "best.pt")
    assert report["models"][0]["label"] == "static-toy-static"


def test_unknown_names_list_the_registered_ones(registered):
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--profile", "smoke", "--init", "x.pt", "--head", "nope"])
    assert result.exit_code == 2 and "toy-rescaled" in result.stderr and "paper" in result.stderr


def test_a_checkpoint_of_an_unregistered_variant_is_bad_input(cli, dense, tmp_path):
    run = tmp_path / "gone"
    cli("train", "--profile", "smoke", "--init", dense, "--head", "toy-rescaled", "--r", "0.9", "--epochs", "1", "--out", run)
    HEADS.unregister("toy-rescaled")
    try:
        result = CliRunner().invoke(app, ["eval", "--profile", "smoke", "--checkpoint", str(run / "best.pt")])
    finally:
        HEADS.register("toy-rescaled")(RescaledHead)
    assert result.exit_code == 2 and "head variant 'toy-rescaled'" in result.stderr and "Traceback" not in result.output
