"""A user's own model, from estimate to eval, with weights saved as a plain state_dict."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from ftwt_cli.io import loading
from ftwt_cli.io.checkpoint import load_checkpoint
from ftwt_cli.io.config import resolve

USER_MODEL = """
from torch import nn


def build(num_classes=10):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )
"""
FAST = ("--samples", "64", "--batch-size", "32")


@pytest.fixture
def cli():
    import ftwt_cli.cli.evaluate  # noqa: F401 - registers every command on the app
    import ftwt_cli.cli.plan  # noqa: F401
    import ftwt_cli.cli.train  # noqa: F401
    from ftwt_cli.cli import app

    runner = CliRunner()

    def run(*args):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result, json.loads(result.stdout)

    return run


@pytest.fixture
def user_model(tmp_path, monkeypatch):
    """mynet.py:build and its 'trained' weights saved as the user would: torch.save(model.state_dict())."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mynet.py").write_text(USER_MODEL)
    namespace: dict = {}
    exec(USER_MODEL, namespace)
    torch.manual_seed(1)
    model = namespace["build"](10)
    with torch.no_grad():  # distinct BN statistics, so that loading them visibly changes the estimate
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    torch.save(model.state_dict(), tmp_path / "mynet.pt")
    return tmp_path, model


def test_model_override_drops_the_profiles_checkpoint():
    assert resolve("quickstart").checkpoint is not None
    assert resolve("quickstart", model="mynet.py:build").checkpoint is None
    assert resolve("quickstart", model="smallnet").checkpoint is not None  # same model: the weights still fit
    assert resolve("resnet18-imagenet", model="x.py:build").pretrained is False
    assert resolve("resnet18-imagenet", model="resnet34").pretrained is False
    assert resolve("quickstart", model="mynet.py:build", checkpoint="w.pt").checkpoint == "w.pt"


def test_estimate_with_a_user_model_and_no_weights_says_how_to_give_them(cli, user_model):
    result, doc = cli("estimate", "--model", "mynet.py:build", *FAST, "--json")  # default profile: quickstart
    assert doc["checkpoint"] is None and doc["config"]["model"] == "mynet.py:build"
    warning = " ".join(line for line in result.stderr.splitlines() if line.startswith("warning:"))
    assert "--checkpoint FILE" in warning and "ftwt train --dense --model mynet.py:build" in warning


def test_plain_state_dict_is_loaded_into_the_user_model(cli, user_model):
    tmp_path, model = user_model
    loaded = loading.load_model(resolve(None, model="mynet.py:build"), "mynet.pt")
    assert loaded.kind == "dense" and loaded.meta["weights"] == "state_dict"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    # the estimate reads those weights: it differs from the initialised model's
    result, with_weights = cli("estimate", "--model", "mynet.py:build", "--checkpoint", "mynet.pt", *FAST, "--json")
    _, initialised = cli("estimate", "--model", "mynet.py:build", *FAST, "--json")
    assert with_weights["checkpoint"] == "mynet.pt" and "warning:" not in result.stderr
    assert [r["flops_reduction_pct"] for r in with_weights["estimates"]] != [r["flops_reduction_pct"] for r in initialised["estimates"]]


@pytest.mark.parametrize("wrap", ["nested", "ddp_prefix"])
def test_common_state_dict_wrappings_are_accepted(user_model, wrap):
    tmp_path, model = user_model
    state = model.state_dict()
    payload = {"state_dict": state, "epoch": 90} if wrap == "nested" else {f"module.{k}": v for k, v in state.items()}
    torch.save(payload, tmp_path / "wrapped.pt")
    loaded = loading.load_model(resolve(None, model="mynet.py:build"), "wrapped.pt")
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(Exception, match="plain weights"):  # commands that need FTWT heads say so
        load_checkpoint(tmp_path / "wrapped.pt")


def test_user_model_from_estimate_to_eval(cli, user_model):
    """The README walk-through: estimate, search, FTWT training from the state_dict, eval against it."""
    _, estimate = cli("estimate", "--model", "mynet.py:build", "--checkpoint", "mynet.pt", "--target-flops", "40", *FAST, "--json")
    assert 0 < estimate["chosen_r"] <= 1
    _, search = cli("search", "--model", "mynet.py:build", "--checkpoint", "mynet.pt", "--target-flops", "40", *FAST, "--json")
    assert 0 < search["chosen_r"] <= 1
    _, run = cli(
        "train", "--model", "mynet.py:build", "--init", "mynet.pt", "--r", "0.9", "--epochs", "1", *FAST,
        "--out", "runs/mynet-ftwt", "--json",
    )  # fmt: skip
    assert run["mode"] == "decoupled" and run["run_dir"] == "runs/mynet-ftwt"
    assert json.loads(open("runs/mynet-ftwt/config.json").read())["init"] == "mynet.pt"
    _, report = cli(
        "eval", "--model", "mynet.py:build", "--checkpoint", "runs/mynet-ftwt/best.pt", "--compare", "mynet.pt",
        "--samples", "64", "--json",
    )  # fmt: skip
    kinds = [m["kind"] for m in report["models"]]
    assert kinds == ["ftwt", "dense"]
    assert report["models"][1]["flops_reduction_pct"] == 0.0
