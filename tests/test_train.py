"""ftwt train: gradients of the two modes, targets, optimizers, resume, non-finite loss, checkpoints, CLI."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

import ftwt_cli.cli.train  # noqa: F401 - registers the train command on the app
from ftwt_cli.core.gating import FTWTModel, head_loss, truth_masks
from ftwt_cli.core.targets import channel_response, make_target
from ftwt_cli.io import loading
from ftwt_cli.io.checkpoint import save_checkpoint
from ftwt_cli.io.config import resolve
from ftwt_cli.io.data import make_loader
from ftwt_cli.models import create_model
from ftwt_cli.workflows import train as training
from ftwt_cli.workflows.train.objectives import CrossEntropyObjective, Loss, MaskObjective
from ftwt_cli.workflows.train.warmup import warm_up_heads

R = make_target("mass", 0.9)


@pytest.fixture(scope="module")
def smoke_cfg():
    return resolve("smoke")


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory, smoke_cfg):
    """An (untrained) dense smallnet checkpoint to start FTWT runs from."""
    path = tmp_path_factory.mktemp("init") / "dense.pt"
    torch.manual_seed(0)
    save_checkpoint(path, create_model("smallnet", 10), loading.dense_meta(smoke_cfg, 10))
    return path


def gated_smallnet(decoupled: bool) -> FTWTModel:
    torch.manual_seed(0)
    model = FTWTModel(create_model("smallnet", 10), (32, 32))
    return model.train().configure(mask_source="predicted", record=True, target=R, decoupled=decoupled)


def test_decoupled_head_loss_never_reaches_the_backbone_joint_does():
    images = torch.randn(8, 3, 32, 32)
    for decoupled in (True, False):
        model = gated_smallnet(decoupled)
        model(images)
        head_loss(model.records(), truth_masks(model.records(), R)).backward()
        backbone_grads = [p.grad for p in model.backbone_parameters() if p.grad is not None]
        head_grads = [p.grad for p in model.head_parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in head_grads)
        if decoupled:
            assert all(torch.equal(g, torch.zeros_like(g)) for g in backbone_grads)
        else:
            assert any(g.abs().sum() > 0 for g in backbone_grads)


def test_targets_come_from_unmasked_block_outputs():
    model = gated_smallnet(decoupled=True)
    block = model.blocks[1]
    with torch.no_grad():  # this head prunes everything: the applied mask is all zero
        block.head.proj.weight.zero_()
        block.head.proj.bias.fill_(-5.0)
    seen = {}
    block.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], out=out))
    model(torch.randn(4, 3, 32, 32))
    rec = model.records()[1]
    assert torch.count_nonzero(seen["out"]) == 0 and rec.mask.sum() == 0
    expected = channel_response(block.activation(block.bn(block.conv(seen["x"]))))
    torch.testing.assert_close(rec.response, expected)
    assert rec.response.sum() > 0  # the targets still see what the unmasked block would output


def test_optimizer_groups_get_their_lr_and_weight_decay(smoke_cfg):
    cfg = smoke_cfg.override(lr=0.02, head_lr=0.3, weight_decay=1e-3, momentum=0.8, dense_lr=0.5)
    model = gated_smallnet(decoupled=True)
    opts = MaskObjective(training.RunSpec(cfg, "ftwt", init="x"), target=None).optimizers(model)
    backbone, heads = opts["backbone"].param_groups[0], opts["heads"].param_groups[0]
    assert (backbone["lr"], backbone["weight_decay"], backbone["momentum"]) == (0.02, 1e-3, 0.8)
    assert (heads["lr"], heads["weight_decay"], heads["momentum"]) == (0.3, 0.0, 0.8)
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert ids(backbone).isdisjoint(ids(heads))
    assert ids(backbone) | ids(heads) == {id(p) for p in model.parameters()}
    assert ids(heads) == {id(p) for p in model.head_parameters()}
    dense = CrossEntropyObjective(training.RunSpec(cfg, "dense")).optimizers(create_model("smallnet", 10))
    assert list(dense) == ["backbone"] and dense["backbone"].param_groups[0]["lr"] == 0.5


def test_head_warm_up_makes_every_head_keep_everything(smoke_cfg):
    model = gated_smallnet(decoupled=False)
    loader = make_loader(loading.dataset(smoke_cfg, "train"), 32)
    before = [p.clone() for p in model.backbone_parameters()]
    steps = warm_up_heads(model, loader, torch.device("cpu"), lr=0.1, momentum=0.9)
    assert steps > 0
    model(next(iter(loader))[0])
    assert all(bool((rec.logits > 0).all()) for rec in model.records())
    assert all(torch.equal(a, b) for a, b in zip(before, model.backbone_parameters()))
    assert not model.blocks[0].detach_head_input  # joint mode restored


def _state(path):
    return torch.load(path, weights_only=True)


def test_resume_repeats_the_straight_run_exactly(run_cli, tmp_path, dense_ckpt):
    # explicit milestones: the profile's would scale with --epochs (1 vs 2), a resumed run keeps its own
    common = ["train", "--profile", "smoke", "--init", dense_ckpt, "--r", "0.9", "--freeze-heads-after", "0.5", "--milestones", "1"]
    straight = run_cli(*common, "--epochs", "2", "--out", tmp_path / "straight")
    assert straight.exit_code == 0, straight.stderr
    first = run_cli(*common, "--epochs", "1", "--out", tmp_path / "resumed")
    assert first.exit_code == 0, first.stderr
    heads_after_epoch_1 = {k: v for k, v in _state(tmp_path / "resumed/last.pt")["model"].items() if ".head." in k}
    resumed = run_cli("train", "--resume", tmp_path / "resumed", "--epochs", "2", "--json")
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads(resumed.stdout)["epochs"] == 2

    a, b = _state(tmp_path / "straight/last.pt"), _state(tmp_path / "resumed/last.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["train_state"]["epoch"] == b["train_state"]["epoch"] == 2
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "straight/metrics.csv"), pd.read_csv(tmp_path / "resumed/metrics.csv"))
    # --freeze-heads-after 0.5 of 2 epochs: the second epoch leaves the heads alone
    assert all(torch.equal(v, b["model"][k]) for k, v in heads_after_epoch_1.items())
    assert pd.read_csv(tmp_path / "resumed/metrics.csv")["heads_frozen"].tolist() == [False, True]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(run_cli, tmp_path, dense_ckpt, monkeypatch):
    calls = {"n": 0}
    original = Loss.__call__

    def poisoned(self, model, logits, labels, images=None):
        calls["n"] += 1
        task, heads, truth = original(self, model, logits, labels, images)
        return (task * math.nan if calls["n"] > 4 else task), heads, truth  # smoke: 4 steps per epoch

    monkeypatch.setattr(Loss, "__call__", poisoned)
    out = tmp_path / "run"
    result = run_cli("train", "--profile", "smoke", "--dense", "--epochs", "3", "--out", out, "--json")
    assert result.exit_code == 1
    assert "non-finite loss" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""
    last = _state(out / "last.pt")
    assert last["train_state"]["epoch"] == 1
    assert all(torch.isfinite(v.float()).all() for v in last["model"].values())
    assert len(pd.read_csv(out / "metrics.csv")) == 1


def test_checkpoints_round_trip_with_the_search_record(run_cli, tmp_path, dense_ckpt, smoke_cfg):
    out = tmp_path / "run"
    result = run_cli(
        "train", "--profile", "smoke", "--init", dense_ckpt, "--target-flops", "40", "--mode", "joint",
        "--no-head-softmax", "--out", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["mode"] == "joint" and summary["estimate"]["target"] == 40.0
    assert summary["r"] == summary["estimate"]["chosen_r"]
    loaded = loading.load_model(smoke_cfg, str(out / "best.pt"), require="ftwt")
    assert isinstance(loaded.model, FTWTModel) and loaded.model.head_spec.softmax is False
    assert loaded.meta["estimate"] == summary["estimate"] and loaded.meta["r"] == summary["r"]
    saved = _state(out / "best.pt")["model"]
    assert all(torch.equal(saved[k], v) for k, v in loaded.model.state_dict().items())
    state = _state(out / "last.pt")["train_state"]  # weights_only=True reads the whole train state
    assert set(state["optimizers"]) == set(state["schedulers"]) == {"backbone", "heads"}
    config = json.loads((out / "config.json").read_text())
    assert config["mode"] == "joint" and config["estimate"] == summary["estimate"]
    metrics = pd.read_csv(out / "metrics.csv")
    expected = {"lr", "task_loss", "head_loss", "train_top1", "test_top1", "head_acc", "flops_reduction_pct"}
    assert expected <= set(metrics.columns)


def test_ci_smoke_dense_then_both_modes(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default run directories land under ./runs
    dense = run_cli("train", "--profile", "smoke", "--dense", "--epochs", "1", "--json")
    assert dense.exit_code == 0, dense.stderr
    doc = json.loads(dense.stdout)
    assert doc["mode"] == "dense" and doc["r"] is None and doc["run_dir"].startswith("runs/smoke-dense-")
    for mode in ("decoupled", "joint"):
        result = run_cli(
            "train", "--profile", "smoke", "--init", f"{doc['run_dir']}/best.pt", "--r", "0.9", "--epochs", "1",
            "--mode", mode, "--json",
        )  # fmt: skip
        assert result.exit_code == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["mode"] == mode and summary["r"] == 0.9 and summary["epochs"] == 1
        assert summary["run_dir"].startswith(f"runs/smoke-{mode}-r0.9-")
        assert 0.0 <= summary["flops_reduction_pct"] <= 100.0
        assert summary["flops_reduction_with_heads_pct"] < summary["flops_reduction_pct"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dense", "--r", "0.9"], "--dense trains the plain backbone"),
        (["--r", "0.9", "--target-flops", "40"], "either --r or --target-flops"),
        (["--r", "0.9"], "needs --init"),
        (["--init", "{dense}", "--target-flops", "150"], "must be in (0, 100)"),
        (["--init", "{dense}", "--mode", "sideways"], "--mode must be decoupled or joint"),
        (["--init", "{dense}", "--target-flops", "99.9"], "outside the reachable range"),
        (["--dense", "--epochs", "0"], "--epochs must be at least 1"),
        (["--dense", "--milestones", "ten"], "--milestones must be comma-separated"),
        (["--init", "{missing}"], "checkpoint not found"),
        (["--resume", "{missing}"], "is not an ftwt run directory"),
        (["--resume", "{missing}", "--lr", "0.1"], "drop --lr"),
        (["--dense", "--out", "{busy}"], "already exists and is not empty"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(run_cli, tmp_path, dense_ckpt, args, message):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/file").write_text("x")
    paths = {"dense": dense_ckpt, "missing": tmp_path / "missing", "busy": tmp_path / "busy"}
    profile = [] if "--resume" in args else ["--profile", "smoke"]  # a resumed run keeps its own profile
    result = run_cli("train", *profile, *[a.format(**paths) for a in args], "--json")
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_dynamic_training_rejects_an_ftwt_init(run_cli, tmp_path, smoke_cfg):
    path = tmp_path / "ftwt.pt"
    save_checkpoint(path, loading.wrap(create_model("smallnet", 10), smoke_cfg), loading.ftwt_meta(smoke_cfg, 10, 0.9))
    result = run_cli("train", "--profile", "smoke", "--init", path, "--out", tmp_path / "run")
    assert result.exit_code == 2 and "needs a dense one" in result.stderr
    assert not (tmp_path / "run").exists()


def test_non_finite_weights_stop_the_run_before_they_are_saved(run_cli, tmp_path, dense_ckpt, monkeypatch):
    from ftwt_cli.workflows.train.run import Run

    original = Run.train_epoch

    def poisoned(self, epoch):
        row = original(self, epoch)
        if epoch == 1:
            with torch.no_grad():
                next(self.model.parameters()).fill_(math.inf)  # the last step overflowed the weights
        return row

    monkeypatch.setattr(Run, "train_epoch", poisoned)
    out = tmp_path / "run"
    result = run_cli("train", "--profile", "smoke", "--dense", "--epochs", "3", "--out", out, "--json")
    assert result.exit_code == 1 and "non-finite weights after epoch 2" in result.stderr
    kept = torch.load(out / "last.pt", weights_only=True)
    assert kept["meta"]["epoch"] == 1 and all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())
