"""Static baselines through torch-pruning, predefined signatures, and frozen heads in joint training."""

from __future__ import annotations

import json

import ptflops
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ftwt_cli.algorithms import static
from ftwt_cli.core.gating import FTWTModel, head_loss, truth_masks
from ftwt_cli.core.graph import analyze
from ftwt_cli.core.targets import FixedCountTarget, make_target
from ftwt_cli.errors import BadInput
from ftwt_cli.io import loading
from ftwt_cli.io.checkpoint import save_checkpoint
from ftwt_cli.io.config import resolve
from ftwt_cli.models import create_model
from ftwt_cli.models.mobilenet import MobileNetV1
from ftwt_cli.models.vgg import VGG
from ftwt_cli.workflows import train as training
from ftwt_cli.workflows.train.objectives import Loss, detach_frozen_heads

SIZE = (32, 32)


class ToyResNet(nn.Module):
    """Two residual stages: identity shortcuts, then a strided stage with a 1×1 conv projection (torchvision style)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.a1, self.a1_bn = nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32)
        self.a2, self.a2_bn = nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32)
        self.b1, self.b1_bn = nn.Conv2d(32, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64)
        self.b2, self.b2_bn = nn.Conv2d(64, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        self.proj = nn.Sequential(nn.Conv2d(32, 64, 1, 2, bias=False), nn.BatchNorm2d(64))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.a2_bn(self.a2(F.relu(self.a1_bn(self.a1(x))))))
        x = F.relu(self.proj(x) + self.b2_bn(self.b2(F.relu(self.b1_bn(self.b1(x))))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def toy_vgg():
    return VGG((32, "M", 64, "M", 64, 64), 10)


def toy_mobilenet():
    return MobileNetV1(10, layout=((64, 1), (64, 2), (128, 1)))


def cifar_resnet20():
    return create_model("resnet20", 10)


TOYS = {"resnet": ToyResNet, "vgg": toy_vgg, "depthwise": toy_mobilenet, "resnet20-option-a": cifar_resnet20}


def dense(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = TOYS[name]()
    # Random BN statistics and scales, so filters differ in importance as in a trained model.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.2, 1.5)
    return model.eval()


def batches(n: int = 2):
    torch.manual_seed(1)
    return [(torch.randn(8, 3, *SIZE), torch.randint(0, 10, (8,))) for _ in range(n)]


def ptflops_macs(model: nn.Module) -> int:
    """ptflops with BN, activations and pooling ignored, linear biases subtracted (ftwt's convention)."""
    ignored = [nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d]
    macs, _ = ptflops.get_model_complexity_info(
        model, (3, *SIZE), as_strings=False, print_per_layer_stat=False, ignore_modules=ignored,
        backend="pytorch", backend_specific_config={"count_functional": False},
    )  # fmt: skip
    return int(macs) - sum(m.out_features for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None)


@pytest.fixture(scope="module")
def pruned():
    """(toy, method) → StaticResult at a 50 % target, computed once per module."""
    cache: dict = {}

    def get(name: str, method: str):
        if (name, method) not in cache:
            model = dense(name)
            if method == "uniform":
                cache[name, method] = static.uniform(model, 50.0, SIZE)
            else:
                cache[name, method] = static.taylor(model, 50.0, SIZE, batches)
        return cache[name, method]

    return get


@pytest.mark.parametrize("method", ["uniform", "taylor"])
@pytest.mark.parametrize("name", list(TOYS))
def test_static_pruning_reaches_the_target_and_the_model_runs(pruned, name, method):
    result = pruned(name, method)
    assert abs(result.reduction_pct - 50.0) <= 1.0, result.reduction_pct
    logits = result.model(torch.randn(2, 3, *SIZE))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    # The reported MACs are ftwt's accounting of the pruned architecture, and ptflops agrees.
    assert result.macs == analyze(result.model, SIZE).dense_macs == ptflops_macs(result.model)
    assert result.dense_macs == analyze(dense(name), SIZE).dense_macs


@pytest.mark.parametrize("name", ["resnet", "vgg", "depthwise"])
def test_uniform_removes_the_same_fraction_from_every_conv(pruned, name):
    result = pruned(name, "uniform")
    before = {n: m.out_channels for n, m in dense(name).named_modules() if isinstance(m, nn.Conv2d)}
    after = {n: m.out_channels for n, m in result.model.named_modules() if isinstance(m, nn.Conv2d)}
    assert not result.whole
    for conv, width in before.items():
        # every layer within one filter of the common fraction (depthwise convs share their producer's filters)
        assert int(width * (1 - result.fraction)) - 1 <= after[conv] <= int(width * (1 - result.fraction)), conv


def test_option_a_residual_streams_are_left_whole_first_convs_pruned(pruned):
    result = pruned("resnet20-option-a", "uniform")
    model = dense("resnet20-option-a")
    stream = ["conv1"] + [f"layers.{i}.conv2" for i in range(9)]
    assert sorted(result.whole) == sorted(stream)
    for i in range(9):
        assert result.model.layers[i].conv1.out_channels < model.layers[i].conv1.out_channels
        assert result.model.layers[i].conv2.out_channels == model.layers[i].conv2.out_channels


def test_taylor_prunes_layers_unevenly(pruned):
    result = pruned("vgg", "taylor")
    fractions = {n: k / dense("vgg").get_submodule(n).out_channels for n, k in result.kept.items()}
    assert result.steps >= 2 and max(fractions.values()) - min(fractions.values()) > 0.05


@pytest.mark.parametrize("name", ["resnet", "depthwise"])
def test_static_checkpoint_is_rebuilt_from_its_history(tmp_path, pruned, name, monkeypatch):
    result = pruned(name, "taylor")
    cfg = resolve("smoke")
    meta = {**loading.dense_meta(cfg, 10), **result.meta(), "model": "toy"}
    path = tmp_path / "static.pt"
    save_checkpoint(path, result.model, meta)
    monkeypatch.setattr(loading, "create_model", lambda spec, classes, pretrained=False: TOYS[name]())
    loaded = loading.load_model(cfg.override(model="toy"), str(path), require="static")
    images = torch.randn(3, 3, *SIZE)
    assert torch.equal(loaded.model.eval()(images), result.model.eval()(images))
    assert json.loads(json.dumps(meta["pruning_history"])) == meta["pruning_history"]  # plain values only


def test_counts_prune_every_layer_to_its_count():
    model = dense("depthwise")
    graph = analyze(model, SIZE)
    kept = {b.conv: max(1, b.out_channels // 3) for b in graph.blocks}
    result = static.counts(model, kept, SIZE)
    assert result.kept == kept
    # The static model costs what dynamic routing with the same counts costs, except that the classifier
    # also loses the pruned inputs (ftwt's dynamic accounting keeps linear layers dense).
    last = graph.blocks[-1]
    linear_saving = (last.out_channels - kept[last.conv]) * 10
    assert result.macs == static.signature_macs(graph, kept) - linear_saving


def test_signature_routing_keeps_exactly_the_count_of_every_block():
    model = FTWTModel(dense("resnet"), SIZE)
    kept = {b.conv: 1 + i * 3 for i, b in enumerate(model.graph.blocks)}
    targets = static.apply_signature(model, kept)
    model.train().configure(mask_source="predicted", record=True, decoupled=False)
    images = torch.randn(6, 3, *SIZE)
    model(images)
    records = model.records()
    for block, rec, target in zip(model.graph.blocks, records, targets):
        assert (rec.mask.sum(dim=1) == kept[block.conv]).all()
        assert (target.mask(rec.response).sum(dim=1) == kept[block.conv]).all()
    # Which filters are kept differs between samples (routing), not only how many.
    assert any(len({tuple(row.tolist()) for row in rec.mask.bool()}) > 1 for rec in records)
    head_loss(records, truth_masks(records, targets)).backward()
    assert all(p.grad is not None for p in model.head_parameters())


def test_fixed_count_target_keeps_the_strongest():
    response = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    assert FixedCountTarget(2).mask(response).tolist() == [[False, True, False, True]]
    with pytest.raises(ValueError):
        FixedCountTarget(0)


@pytest.mark.parametrize(
    ("doc", "message"),
    [({"nope": 3}, "not a gated block"), ({"features.0.0": 0}, "must keep 1..32"), ([1, 2], "must map")],
)
def test_signature_files_are_checked(tmp_path, doc, message):
    path = tmp_path / "sig.json"
    path.write_text(json.dumps(doc))
    widths = {b.conv: b.out_channels for b in analyze(dense("depthwise"), SIZE).blocks}
    with pytest.raises(BadInput, match=message):
        static.read_signature(str(path), widths)


def test_unreachable_uniform_target_is_bad_input():
    with pytest.raises(BadInput, match="lower --target-flops"):
        static.uniform(dense("vgg"), 99.5, SIZE)


# --- joint mode: frozen heads are out of the graph ----------------------------------------------------


def test_frozen_heads_in_joint_mode_pass_no_gradient():
    torch.manual_seed(0)
    model = FTWTModel(create_model("smallnet", 10), SIZE).train()
    target = make_target("mass", 0.8)
    model.configure(mask_source="predicted", record=True, target=target, decoupled=False)
    images, labels = torch.randn(8, 3, *SIZE), torch.randint(0, 10, (8,))

    detach_frozen_heads(model, frozen=True, mode="joint")
    objective = Loss(target, head_weight=0.0)  # what train_epoch uses once heads are frozen
    task, heads, _ = objective(model, model(images), labels)
    (task + objective.head_weight * heads).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.head_parameters())
    frozen_grads = [p.grad.clone() for p in model.backbone_parameters()]

    # Reference: the same masks fed in as constants (no head anywhere in the graph).
    masks = [rec.mask.detach() for rec in model.records()]
    model.zero_grad(set_to_none=True)
    model.configure(record=False)
    for block, mask in zip(model.blocks, masks):
        block.head.forward = lambda x, m=mask: torch.where(m > 0, 10.0, -10.0)  # constant logits, same mask
    F.cross_entropy(model(images), labels).backward()
    for got, want in zip(frozen_grads, [p.grad for p in model.backbone_parameters()]):
        assert torch.allclose(got, want, atol=1e-7, rtol=0)

    # Unfrozen joint mode does send the task loss through the heads (the test above could fail).
    model.zero_grad(set_to_none=True)
    del model.blocks[0].head.forward
    detach_frozen_heads(model, frozen=False, mode="joint")
    model.configure(record=True)
    F.cross_entropy(model(images), labels).backward()
    assert model.blocks[0].head.proj.weight.grad.abs().sum() > 0


def test_train_epoch_detaches_frozen_heads(tmp_path):
    cfg = resolve("smoke", mode="joint", freeze_heads_after=0.0)
    init = tmp_path / "dense.pt"
    torch.manual_seed(0)
    save_checkpoint(init, create_model("smallnet", 10), loading.dense_meta(cfg, 10))
    spec = training.RunSpec(cfg, "ftwt", init=str(init))
    run = training.build_run(spec)
    heads_before = [p.detach().clone() for p in run.model.head_parameters()]
    assert not run.model.blocks[0].detach_head_input  # joint mode before freezing
    row = run.train_epoch(0)
    assert row["heads_frozen"]
    assert all(b.detach_head_input and not b.straight_through for b in run.model.blocks)
    assert all(torch.equal(a, b) for a, b in zip(heads_before, run.model.head_parameters()))
