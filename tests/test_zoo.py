"""The model zoos through the real CLI: a timm model with fused BN+activation, depthwise and squeeze-excite
blocks and a torchvision model given as a plain state_dict (mnasnet reads its version from the
state_dict's metadata) go through estimate, train, calibrate, eval and the engine's exactness check; a
model without a conv→BN block and one too deep for its input are refused in one line (exit 2). The whole
zoo runs in ``benchmarks/zoo.py``."""

from __future__ import annotations

import builtins
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from ftwt_cli.core.batchnorm import FusedTail, split_batchnorm
from ftwt_cli.core.gating import FTWTModel
from ftwt_cli.core.graph import UnsupportedModel, analyze
from ftwt_cli.engine import build_engine
from ftwt_cli.errors import BadInput
from ftwt_cli.io import loading
from ftwt_cli.io.config import resolve
from ftwt_cli.models import create_model

TINY = """description = "tests/test_zoo.py: tiny passes"
model = "smallnet"
data = "synthetic"
samples = 16
train_samples = 16
test_samples = 8
val_fraction = 0.25
batch_size = 8
ratios = "0.80:1.00:0.05"
r = 0.9

[dynamic]
epochs = 1
milestones = [1]
"""


def invoke(*args):
    from ftwt_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args) -> dict:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def refused(*args) -> str:
    result = invoke(*args)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(("config:", "warning:"))]
    assert result.exit_code == 2 and len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture
def profile(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return str(path)


def engine_is_exact(profile: str, spec: str, checkpoint) -> None:
    cfg = resolve(profile, model=spec)
    model = loading.load_model(cfg, str(checkpoint)).model.eval().configure(mask_source="predicted", record=True)
    images = loading.first_test_images(cfg, 2)
    with torch.no_grad():
        expected = model(images)
    masks = [r.mask.bool() for r in model.records()]
    model.configure(record=False)
    engine = build_engine(model)
    for i in range(2):
        assert (engine(images[i : i + 1]) - expected[i : i + 1]).abs().max().item() <= 1e-4
        assert all(torch.equal(e, m[i]) for e, m in zip(engine.block_masks(), masks))


def pipeline(tmp_path, profile: str, spec: str, weights) -> dict:
    """estimate → train --r 0.9 → calibrate → eval → engine check; the estimate's document."""
    common = ("--profile", profile, "--model", spec)
    estimate = ok("estimate", *common, "--checkpoint", weights)
    ok("train", *common, "--init", weights, "--r", "0.9", "--out", tmp_path / "run")
    ok("calibrate", tmp_path / "run/best.pt", *common, "--target-flops", "10", "--out", tmp_path / "calibrated.pt")
    report = ok("eval", *common, "--checkpoint", tmp_path / "calibrated.pt")["models"][0]
    assert report["kind"] == "ftwt" and report["estimate"]["calibrated"]
    engine_is_exact(profile, spec, tmp_path / "calibrated.pt")
    return estimate


def test_timm_model_with_fused_bn_act_depthwise_and_se_blocks(tmp_path, profile):
    pytest.importorskip("timm")
    model = create_model("timm:test_efficientnet", 10)
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"BatchNormAct2d", "SqueezeExcite"} <= kinds
    assert any(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 for m in model.modules())  # depthwise
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    estimate = pipeline(tmp_path, profile, "timm:test_efficientnet", tmp_path / "dense.pt")
    fused = [m for m in model.modules() if type(m).__name__ == "BatchNormAct2d"]
    graph = analyze(model, (32, 32))
    assert len(estimate["estimates"][0]["per_layer_keep"]) == len(graph.blocks) >= len(fused) - 2  # stem/head BNs too
    assert any(b.activation is F.silu for b in graph.blocks)  # the fused SiLU is the block's activation


def test_torchvision_model_from_a_plain_state_dict_keeps_its_metadata(tmp_path, profile):
    model = create_model("torchvision:mnasnet0_5", 10)
    torch.save(model.state_dict(), tmp_path / "dense.pt")  # carries _metadata: MNASNet's version
    pipeline(tmp_path, profile, "torchvision:mnasnet0_5", tmp_path / "dense.pt")


def test_models_ftwt_cannot_gate_are_refused_in_one_line(profile):
    line = refused("estimate", "--profile", profile, "--model", "torchvision:squeezenet1_0")
    assert "SqueezeNet has no conv→BN block to gate" in line
    line = refused("estimate", "--profile", profile, "--model", "torchvision:inception_v3")
    assert "does not run on 3×32×32 inputs" in line and "Inception3" in line
    assert "did you mean resnet18" in refused("estimate", "--profile", profile, "--model", "torchvision:resnet81")


def test_timm_missing_is_one_line_telling_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("no timm")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    monkeypatch.setattr("importlib.import_module", lambda name: no_timm(name))
    with pytest.raises(BadInput, match=r"pip install 'ftwt\[timm\]'"):
        create_model("timm:resnet18", 10)


class FusedBNReLU(nn.BatchNorm2d):
    """A BN with its activation fused in, as timm's BatchNormAct2d is built."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.drop, self.act = nn.Identity(), nn.ReLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class ShiftedBN(nn.BatchNorm2d):
    """A BN subclass that does something else than BN → act: not a block's BN."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x)) + 1


def tiny(bn=FusedBNReLU) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), bn(8), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),  # a block at 1×1: one image has no batch statistics
        nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip


def test_fused_bn_is_a_block_whose_activation_stays_in_the_backbone():
    model = tiny().train()
    graph = analyze(model, (16, 16))  # traced in eval mode: the 1×1 block needs no batch statistics
    assert model.training and [b.conv for b in graph.blocks] == ["0", "3", "7"]
    assert graph.blocks[0].activation is F.relu and graph.convs[1].producer == 0
    reference = copy.deepcopy(model).eval()
    gated = FTWTModel(model, (16, 16)).eval()
    assert isinstance(gated.backbone[1], FusedTail) and isinstance(gated.backbone[1].act, nn.ReLU)
    assert type(gated.blocks[0].bn) is nn.BatchNorm2d
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(gated(x), reference(x), atol=1e-6)  # masks off: the backbone it was
        gated.configure(mask_source="predicted")
        engine = build_engine(gated)
        assert torch.allclose(engine(x[:1]), gated(x[:1]), atol=1e-5)


def test_a_bn_subclass_with_another_forward_is_not_a_block():
    assert split_batchnorm(ShiftedBN(8)) is None
    graph = analyze(tiny(ShiftedBN), (16, 16))
    assert [b.conv for b in graph.blocks] == ["3", "7"]


def test_a_model_that_cannot_run_on_its_input_is_unsupported():
    with pytest.raises(UnsupportedModel, match="does not run on 3×4×4 inputs"):
        analyze(nn.Sequential(nn.Conv2d(3, 4, 7), nn.BatchNorm2d(4)), (4, 4))


class InPlaceShortcut(nn.Module):
    """A block output changed in place (``y.add_(x)``) keeps no zeros: it is no producer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        y.add_(x[:, :1])
        return self.bn2(self.conv2(y))


def test_a_node_changed_in_place_is_no_producer():
    graph = analyze(InPlaceShortcut(), (8, 8))
    assert len(graph.blocks) == 2 and graph.convs[1].producer is None


class ShapeBranch(nn.Module):
    """timm's VGG head: control flow on the input's shape, which fx cannot trace."""

    def forward(self, x):
        if x.shape[-1] > 2:
            x = F.adaptive_avg_pool2d(x, 2)
        return x.flatten(1)


def test_a_submodule_fx_cannot_trace_becomes_one_leaf_node():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), ShapeBranch(), nn.Linear(32, 3),
    )  # fmt: skip
    graph = analyze(model, (8, 8))
    assert graph.traced and [b.conv for b in graph.blocks] == ["0", "3"] and graph.convs[1].producer == 0
    gated = FTWTModel(model, (8, 8)).eval().configure(mask_source="predicted")
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(build_engine(gated)(x), gated(x), atol=1e-5)


def test_zoo_script_reports_a_failed_weight_save_as_the_model_row(tmp_path, monkeypatch):
    """A full disk while saving one model's random weights is that model's error row, not a traceback
    that ends the whole zoo run."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo.py"
    spec = importlib.util.spec_from_file_location("zoo_script", script)
    zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zoo.torch, "save", disk_full)
    row = zoo.run_model("torchvision:resnet18", 32, tmp_path, quick=True, steps=("estimate", "train"))
    assert row["passed"] is False and row["refused"] is None
    assert row["steps"]["estimate"]["status"] == "error" and "No space left" in row["steps"]["estimate"]["message"]
    assert row["steps"]["train"] == {"status": "skipped"}
