"""MAC accounting (dense vs ptflops and the paper's figures; dynamic, hand-counted) and the estimate pass."""

from __future__ import annotations

import math

import ptflops
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ftwt_cli.algorithms.estimate import EstimateAccumulator, estimate
from ftwt_cli.core.flops import FlopsCounter, count_kept, ratio_levels, thresholds_from_masks
from ftwt_cli.core.gating import FTWTModel
from ftwt_cli.core.graph import analyze
from ftwt_cli.core.targets import CumulativeMassTarget, keep_thresholds
from ftwt_cli.io.data import SyntheticImages, build_transform, make_loader, parse_data
from ftwt_cli.models import create_model

CIFAR_MODELS = ["smallnet", "vgg16_bn", "resnet20", "resnet56", "mobilenetv1"]
PAPER_DENSE_MACS = {"vgg16_bn": 313.5e6, "resnet56": 125.5e6, "mobilenetv1": 46.4e6}


def ptflops_macs(model: nn.Module) -> int:
    """ptflops with BN, activations and pooling ignored (the paper's convention)."""
    ignored = [nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d]
    macs, _ = ptflops.get_model_complexity_info(
        model,
        (3, 32, 32),
        as_strings=False,
        print_per_layer_stat=False,
        ignore_modules=ignored,
        backend="pytorch",
        backend_specific_config={"count_functional": False},
    )
    return int(macs)


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_dense_macs_match_ptflops(name):
    model = create_model(name, 10)
    graph = analyze(model, (32, 32))
    # ptflops also charges one MAC per linear bias output; we count conv and linear weights only
    bias_outputs = sum(m.out_features for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None)
    assert ptflops_macs(model) == graph.dense_macs + bias_outputs
    assert FlopsCounter(graph).dense_macs == graph.dense_macs


@pytest.mark.parametrize("name", sorted(PAPER_DENSE_MACS))
def test_dense_macs_match_the_paper(name):
    macs = analyze(create_model(name, 10), (32, 32)).dense_macs
    assert macs == pytest.approx(PAPER_DENSE_MACS[name], rel=0.01)


# --- dynamic MACs, hand-counted -------------------------------------------------------------------------


def test_producer_is_found_through_relu_and_maxpool(tiny_net):
    graph = analyze(tiny_net, (8, 8))
    assert [c.name for c in graph.convs] == ["conv1", "conv2"]
    assert [(c.block, c.producer) for c in graph.convs] == [(0, None), (1, 0)]
    assert [c.out_hw for c in graph.convs] == [(8, 8), (4, 4)]


class FunctionalNet(nn.Module):
    """Same shape as TinyNet, written with functional ReLU/max-pool and a residual add at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        y = self.bn2(self.conv2(x)).relu()
        return self.conv3(x + y)  # through an add: the input channels are not zeroed by one mask


def test_producer_through_functional_ops_and_not_through_an_add():
    graph = analyze(FunctionalNet(), (8, 8))
    assert [(c.name, c.block, c.producer) for c in graph.convs] == [
        ("conv1", 0, None),
        ("conv2", 1, 0),
        ("conv3", None, None),
    ]


def test_dynamic_macs_hand_counted_on_two_conv_net(tiny_net):
    counter = FlopsCounter(analyze(tiny_net, (8, 8)))
    conv1_dense, conv2_dense, linear = 4 * 3 * 9 * 64, 6 * 4 * 9 * 16, 6 * 2
    assert counter.dense_macs == conv1_dense + conv2_dense + linear == 10380
    assert counter.head_macs == 3 * 4 + 4 * 6

    m1 = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    m2 = torch.tensor([[1, 0, 1, 0, 1, 0], [1] * 6, [1] * 6, [0] * 6], dtype=torch.bool)
    expected = [
        2 * 3 * 9 * 64 + 3 * 2 * 9 * 16 + 12,  # 3456 + 864 + 12
        10380,  # everything active: dense
        0 + 0 + 12,  # no active conv1 output → conv2 has no active inputs
        1 * 3 * 9 * 64 + 0 + 12,  # conv2 fully pruned
    ]
    assert counter.macs_from_masks([m1, m2]).tolist() == expected
    assert counter.macs_from_masks([m1.float(), m2.float()]).tolist() == expected

    t1 = torch.tensor([[0.0, 0.3, 0.6, math.inf], [0.0, 0.1, 0.2, 0.9]])
    t2 = torch.tensor([[0.0, 0.5, 0.5, 0.7, 1.0, math.inf], [0.0] * 6])
    for r in (0.05, 0.3, 0.5, 0.65, 0.9, 1.0):
        got = counter.dynamic_macs([t1, t2], [r])[:, 0].tolist()
        for n in range(2):
            k1 = sum(1 for t in t1[n].tolist() if t <= r + 1e-6)
            k2 = sum(1 for t in t2[n].tolist() if t <= r + 1e-6)
            assert got[n] == k1 * 3 * 9 * 64 + k2 * k1 * 9 * 16 + 12, (r, n)
    # several ratios in one call give the columns of single-ratio calls
    many = counter.dynamic_macs([t1, t2], [0.05, 0.3, 0.5, 1.0])
    for j, r in enumerate([0.05, 0.3, 0.5, 1.0]):
        assert torch.equal(many[:, j], counter.dynamic_macs([t1, t2], [r])[:, 0])


class DepthwiseNet(nn.Module):
    """stem conv → depthwise 3×3 → pointwise 1×1, each conv→BN→ReLU; one stride-2 depthwise."""

    def __init__(self) -> None:
        super().__init__()

        def cbr(cin, cout, k, stride=1, groups=1):
            return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(*cbr(3, 4, 3), *cbr(4, 4, 3, stride=2, groups=4), *cbr(4, 6, 1))
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


def test_dynamic_macs_hand_counted_on_depthwise_net():
    counter = FlopsCounter(analyze(DepthwiseNet(), (8, 8)))
    assert [(c.groups, c.block, c.producer, c.out_hw) for c in counter.graph.convs] == [
        (1, 0, None, (8, 8)),
        (4, 1, 0, (4, 4)),
        (1, 2, 1, (4, 4)),
    ]
    assert counter.dense_macs == 4 * 3 * 9 * 64 + 4 * 9 * 16 + 6 * 4 * 16 + 12

    m0 = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    m1 = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    m2 = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    expected = [
        # stem 3 outputs; depthwise channels active on both sides: 0 and 3; pointwise 2 out × 3 in
        3 * 3 * 9 * 64 + 2 * 9 * 16 + 2 * 3 * 16 + 12,
        # stem pruned: depthwise has no active input (costs 0) but the pointwise still reads its
        # 4 (BN-bias) output channels
        0 + 0 + 6 * 4 * 16 + 12,
    ]
    assert counter.macs_from_masks([m0, m1, m2]).tolist() == expected

    t0 = torch.tensor([[0.0, 0.2, 0.8, 0.4]])
    t1 = torch.tensor([[0.5, 0.0, 0.3, math.inf]])
    t2 = torch.tensor([[0.0, 0.1, 0.45, 0.6, 0.9, 1.0]])
    for r in (0.1, 0.35, 0.5, 0.85, 1.0):
        k = lambda t: [v <= r + 1e-6 for v in t[0].tolist()]  # noqa: E731
        k0, k1, k2 = k(t0), k(t1), k(t2)
        dw = sum(a and b for a, b in zip(k0, k1))
        want = sum(k0) * 3 * 9 * 64 + dw * 9 * 16 + sum(k2) * sum(k1) * 16 + 12
        assert counter.dynamic_macs([t0, t1, t2], [r]).item() == want, r


def test_grouped_conv_counts_active_pairs_per_group():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 1, groups=2, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
    )  # fmt: skip
    counter = FlopsCounter(analyze(model, (2, 2)))
    m0 = torch.tensor([[1, 0, 1, 1]], dtype=torch.bool)  # group inputs: {0,1} → 1 active, {2,3} → 2
    m1 = torch.tensor([[1, 1, 0, 0, 0, 1]], dtype=torch.bool)  # group outputs: {0,1,2} → 2, {3,4,5} → 1
    assert counter.macs_from_masks([m0, m1]).item() == 3 * 3 * 4 + (2 * 1 + 1 * 2) * 4


def test_reduction_with_and_without_heads(tiny_net):
    counter = FlopsCounter(analyze(tiny_net, (8, 8)))
    half = counter.dense_macs / 2
    assert counter.reduction_pct(half) == pytest.approx(50.0)
    assert counter.reduction_pct(half, with_heads=True) == pytest.approx(50.0 - 100 * counter.head_macs / counter.dense_macs)


def test_count_kept_matches_direct_comparison():
    g = torch.Generator().manual_seed(3)
    t = torch.rand(9, 17, generator=g)
    t[t > 0.9] = math.inf
    t[:, 0] = 0.0
    ratios = [0.05, 0.5, 0.33, 1.0, 0.7]  # unsorted on purpose
    levels = ratio_levels(ratios)
    expected = (t[:, :, None] <= levels[None, None, :]).sum(dim=1)
    assert torch.equal(count_kept(t, levels), expected)
    assert thresholds_from_masks([torch.tensor([[True, False]])])[0].tolist() == [[0.0, math.inf]]


# --- the estimate pass -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smallnet_and_loader():
    torch.manual_seed(0)
    gated = FTWTModel(create_model("smallnet", 10), (32, 32)).eval()
    images = SyntheticImages("train", size=48, transform=build_transform(parse_data("synthetic"), "cifar", False))
    return gated, make_loader(images, 16)


def test_estimate_is_monotone_in_r(smallnet_and_loader):
    gated, loader = smallnet_and_loader
    ratios = [i / 40 for i in range(1, 41)]
    est = estimate(gated, loader, ratios, torch.device("cpu"))
    assert est.samples == 48
    reductions = [est.reduction_pct(i) for i in range(len(ratios))]
    assert all(a >= b for a, b in zip(reductions, reductions[1:]))
    assert reductions[0] > reductions[-1] + 10  # and it really moves
    for per_ratio in est.keep:
        assert all(a <= b for a, b in zip(per_ratio, per_ratio[1:]))
        assert all(0.0 < k <= 1.0 for k in per_ratio)
    for i in range(len(ratios)):
        assert est.reduction_pct(i, with_heads=True) < est.reduction_pct(i)


def test_estimate_equals_the_mean_of_ground_truth_mask_macs(smallnet_and_loader):
    gated, loader = smallnet_and_loader
    ratios = [0.5, 0.9, 1.0]
    est = estimate(gated, loader, ratios, torch.device("cpu"))
    counter = FlopsCounter(gated.graph)
    totals, kept = [0.0] * 3, [[0.0] * 3 for _ in gated.blocks]
    gated.configure(mask_source="dense", record=True)
    with torch.no_grad():
        for images, _ in loader:
            gated(images)
            responses = [rec.response for rec in gated.records()]
            for j, r in enumerate(ratios):
                masks = [CumulativeMassTarget(r).mask(resp) for resp in responses]
                totals[j] += float(counter.macs_from_masks(masks).sum())
                for b, m in enumerate(masks):
                    kept[b][j] += float(m.float().mean(dim=1).sum())
    gated.configure(record=False)
    assert est.mean_macs == pytest.approx([t / 48 for t in totals], rel=1e-12)
    assert est.keep == [pytest.approx([k / 48 for k in row], rel=1e-9) for row in kept]


def test_two_ratios_equal_the_matching_rows_of_many(smallnet_and_loader):
    gated, loader = smallnet_and_loader
    many_ratios = [round(0.8 + 0.01 * i, 10) for i in range(21)]
    many = estimate(gated, loader, many_ratios, torch.device("cpu"))
    two = estimate(gated, loader, [0.85, 0.95], torch.device("cpu"))
    for i, r in enumerate(two.ratios):
        j = many.index_of(r)
        assert many.ratios[j] == r
        assert two.mean_macs[i] == pytest.approx(many.mean_macs[j], rel=1e-12)
        assert two.reduction_pct(i, with_heads=True) == pytest.approx(many.reduction_pct(j, with_heads=True))
        assert two.rows()[i]["per_layer_keep"] == pytest.approx(many.rows()[j]["per_layer_keep"], rel=1e-12)


def test_accumulator_state_does_not_grow_with_samples(smallnet_and_loader):
    gated, _ = smallnet_and_loader
    counter = FlopsCounter(gated.graph)
    channels = [b.out_channels for b in gated.graph.blocks]

    def state_after(samples: int) -> dict[str, tuple]:
        acc = EstimateAccumulator(counter, [0.8, 0.9, 1.0], torch.device("cpu"))
        g = torch.Generator().manual_seed(samples)
        for _ in range(3):
            acc.update([keep_thresholds(torch.rand(samples, c, generator=g)) for c in channels])
        assert acc.samples == 3 * samples
        return {k: tuple(v.shape) for k, v in vars(acc).items() if isinstance(v, torch.Tensor)}

    small, large = state_after(2), state_after(64)
    assert small == large
    assert small["sum_kept"] == (len(channels), 3) and small["sum_macs"] == (3,)
