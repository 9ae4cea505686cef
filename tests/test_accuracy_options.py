"""Options that trade FTWT's accuracy against its dynamism: which blocks are gated, distillation from
the dense model, routing among K prototype masks, BN statistics re-estimated under the final masks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ftwt_cli.algorithms.bn_stats import backbone_batchnorms, reestimate_batchnorm
from ftwt_cli.core.flops import FlopsCounter
from ftwt_cli.core.gating import FTWTModel
from ftwt_cli.core.targets import make_target
from ftwt_cli.io import loading
from ftwt_cli.io.checkpoint import load_checkpoint
from ftwt_cli.io.config import resolve
from ftwt_cli.models import create_model
from ftwt_cli.workflows.train.objectives import Distillation, Loss


@pytest.fixture(scope="module")
def cli(cli_json):
    return cli_json


@pytest.fixture(scope="module")
def dense(cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy") / "dense"
    cli("train", "--profile", "smoke", "--dense", "--epochs", "1", "--out", out)
    return out / "best.pt"


class FixedTeacher(nn.Module):
    """A teacher whose logits are known: the same row for every image."""

    def __init__(self, row: torch.Tensor) -> None:
        super().__init__()
        self.row = row

    def forward(self, images):
        return self.row.expand(images.shape[0], -1)


def test_distillation_changes_the_task_loss_by_its_formula_and_nothing_else():
    torch.manual_seed(0)
    model = FTWTModel(create_model("smallnet", 10), (32, 32)).train()
    target = make_target("mass", 0.8)
    model.configure(mask_source="predicted", record=True, target=target)
    images, labels = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    teacher_row = torch.linspace(-2.0, 3.0, 10)
    logits = model(images)
    plain_task, plain_heads, plain_truth = Loss(target)(model, logits, labels, images)
    kd = Distillation(FixedTeacher(teacher_row), temperature=4.0, weight=0.3)
    task, heads, truth = Loss(target, distillation=kd)(model, logits, labels, images)

    student = (logits / 4.0).log_softmax(1)
    teacher = (teacher_row / 4.0).softmax(0).expand_as(student)
    kl = (teacher * (teacher.log() - student)).sum(1).mean()
    expected = 0.7 * F.cross_entropy(logits, labels) + 0.3 * 16.0 * kl
    torch.testing.assert_close(task, expected)
    assert not torch.allclose(task, plain_task)
    torch.testing.assert_close(heads, plain_heads)  # the heads' loss and targets are untouched
    assert all(torch.equal(a, b) for a, b in zip(truth, plain_truth))


def test_distillation_from_a_teacher_equal_to_the_student_at_weight_one_is_zero():
    logits = torch.randn(4, 10)
    kd = Distillation(FixedTeacher(logits[0]), temperature=2.0, weight=1.0)
    value = kd(torch.tensor(5.0), logits[:1].expand(4, -1), torch.zeros(4, 3, 8, 8))
    assert value.abs() < 1e-6


def test_internal_gates_leave_the_convs_before_residual_adds_ungated():
    model = create_model("resnet20", 10)
    every = FTWTModel(create_model("resnet20", 10), (32, 32))
    internal = FTWTModel(model, (32, 32), gate="internal")
    assert [b.conv for b in internal.graph.blocks] == [f"layers.{i}.conv1" for i in range(9)]
    assert len(every.graph.blocks) == 19  # the stem, and both convs of 9 blocks
    assert internal.graph.dense_macs == every.graph.dense_macs


def test_options_reach_the_run_record_and_the_eval_labels(cli, dense, tmp_path):
    run = tmp_path / "options"
    cli(
        "train", "--profile", "smoke", "--init", dense, "--target-flops", "40", "--epochs", "2", "--gate", "internal",
        "--distill", "3", "--codebook", "2", "--bn-reestimate", "--out", run,
    )  # fmt: skip
    config = json.loads((run / "config.json").read_text())["config"]
    assert (config["gate"], config["distill"], config["codebook"], config["bn_reestimate"]) == ("internal", 3.0, 2, True)
    meta = load_checkpoint(run / "best.pt")["meta"]
    assert (meta["gate"], meta["distill"], meta["codebook"], meta["bn_reestimate"]) == ("internal", 3.0, 2, True)
    assert meta["codebook_sizes"] and max(meta["codebook_sizes"]) <= 2
    label = cli("eval", "--profile", "smoke", "--checkpoint", run / "best.pt")["models"][0]["label"]
    for part in ("internal-gates", "codebook-2", "kd T=3", "bn-reestimated"):
        assert part in label, label

    static = tmp_path / "static-kd"
    cli("train", "--profile", "smoke", "--init", dense, "--static", "uniform", "--target-flops", "40", "--distill", "3", "--epochs", "1", "--out", static)
    assert load_checkpoint(static / "best.pt")["meta"]["distill"] == 3.0
    assert cli("eval", "--profile", "smoke", "--checkpoint", static / "best.pt")["models"][0]["label"] == "static-uniform kd T=3"


def test_a_codebook_of_one_is_one_mask_per_layer_and_its_flops_are_the_prototypes(cli, dense, tmp_path):
    run = tmp_path / "k1"
    cli("train", "--profile", "smoke", "--init", dense, "--target-flops", "40", "--epochs", "2", "--codebook", "1", "--out", run)
    report = cli("eval", "--profile", "smoke", "--checkpoint", run / "best.pt")["models"][0]
    assert all(layer["clusters"] == 1 for layer in report["layers"])
    model = loading.load_model(resolve("smoke"), str(run / "best.pt"), require="ftwt").model
    prototypes = [block.codebook.prototypes > 0 for block in model.blocks]
    assert all(p.shape[0] == 1 for p in prototypes)
    counter = FlopsCounter(model.graph)
    macs = float(counter.macs_from_masks(prototypes)[0])
    assert report["flops_reduction_with_heads_pct"] == pytest.approx(counter.reduction_pct(macs, with_heads=True), abs=1e-9)


def test_bn_statistics_are_recomputed_under_the_masks_and_heads_keep_theirs():
    torch.manual_seed(0)
    model = FTWTModel(create_model("smallnet", 10), (32, 32), head=loading.head_spec(resolve("smoke", head_norm=True)))
    model.configure(mask_source="predicted")
    images = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    head_stats = [h.norm.running_mean.clone() for h in model.heads()]
    norms = backbone_batchnorms(model)
    for m in norms:
        m.running_mean.fill_(5.0)
    assert reestimate_batchnorm(model, images, torch.device("cpu")) == 24
    first = model.blocks[0]
    with torch.no_grad():  # the first block sees the raw images: its mean is the conv output's mean
        expected = torch.cat([first.conv(x) for x in images]).mean(dim=(0, 2, 3))
    torch.testing.assert_close(first.bn.running_mean, expected, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a, h.norm.running_mean) for a, h in zip(head_stats, model.heads()))
    assert all(m.momentum == 0.1 for m in norms) and not model.training


def test_ftwt_calibrate_resizes_a_codebook_checkpoint(cli, dense, tmp_path):
    run = tmp_path / "k2"
    cli("train", "--profile", "smoke", "--init", dense, "--target-flops", "40", "--epochs", "2", "--codebook", "2", "--out", run)
    before = load_checkpoint(run / "best.pt")["meta"]["codebook_sizes"]
    record = cli("calibrate", run / "best.pt", "--profile", "smoke", "--target-flops", "30", "--out", tmp_path / "k2-30.pt")
    assert record["refit"] and abs(record["reached_pct"] - 30) < abs(record["raw_pct"] - 30)
    assert load_checkpoint(tmp_path / "k2-30.pt")["meta"]["codebook_sizes"] == before  # the same groups, re-sized
