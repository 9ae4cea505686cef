"""Algorithm 1 (ground-truth masks), the topk target, decision heads and the STE binarisation."""

from __future__ import annotations

import math

import pytest
import torch

from ftwt_cli.core.gating import binarize
from ftwt_cli.core.heads import DecisionHead, HeadSpec
from ftwt_cli.core.targets import (
    EPS,
    CumulativeMassTarget,
    TopKTarget,
    ground_truth_mask,
    keep_thresholds,
    make_target,
    topk_mask,
)


def activations_with_peaks(peaks: list[list[float]], size: int = 3) -> torch.Tensor:
    """[N, C, size, size] whose GMP(|O|) per channel is ``peaks``; peaks sit at varying spots and signs."""
    n, c = len(peaks), len(peaks[0])
    out = torch.zeros(n, c, size, size)
    for i, row in enumerate(peaks):
        for j, peak in enumerate(row):
            out[i, j] = peak * 0.25  # smaller values everywhere...
            sign = -1.0 if (i + j) % 2 else 1.0  # ...and the peak, negative in half of the channels
            out[i, j, (i + j) % size, j % size] = sign * peak
    return out


def reference_algorithm1(response: list[float], r: float) -> list[bool]:
    """Algorithm 1 written out per channel: sort descending (ties by index), prune where cumsum > r."""
    total = sum(response)
    keep = [False] * len(response)
    if total == 0:
        return keep
    order = sorted(range(len(response)), key=lambda c: (-response[c], c))
    cumulative = 0.0
    for position, c in enumerate(order):
        cumulative += response[c] / total
        if response[c] > 0 and (position == 0 or cumulative <= r + EPS):
            keep[c] = True
    return keep


def mask_list(mask: torch.Tensor) -> list[list[bool]]:
    return [[bool(v) for v in row] for row in mask]


def test_r_one_prunes_exactly_the_zero_max_channels():
    acts = activations_with_peaks([[3.0, 0.0, 1.0, 0.0, 0.5], [0.0, 2.0, 2.0, 2.0, 0.0]])
    assert mask_list(ground_truth_mask(acts, 1.0)) == [[True, False, True, False, True], [False, True, True, True, False]]


def test_response_uses_the_absolute_peak():
    acts = torch.zeros(1, 2, 2, 2)
    acts[0, 0, 0, 0] = -5.0  # the strongest channel only by magnitude
    acts[0, 1, 1, 1] = 1.0
    # shares 5/6 and 1/6: at r = 0.5 only the negative-peaked channel survives
    assert mask_list(ground_truth_mask(acts, 0.5)) == [[True, False]]


def test_ties_are_broken_by_channel_index():
    acts = activations_with_peaks([[1.0, 2.0, 1.0, 2.0]])
    # order 1, 3, 0, 2 (ties: lower index first); cumulative shares 1/3, 2/3, 5/6, 1
    assert keep_thresholds(torch.tensor([[1.0, 2.0, 1.0, 2.0]]))[0].tolist() == pytest.approx([5 / 6, 0.0, 1.0, 2 / 3])
    assert mask_list(ground_truth_mask(acts, 0.5)) == [[False, True, False, False]]
    assert mask_list(ground_truth_mask(acts, 0.7)) == [[False, True, False, True]]
    # equal peaks, but only channel 0 (lower index) is inside 5/6
    assert mask_list(ground_truth_mask(acts, 0.84)) == [[True, True, False, True]]
    equal = activations_with_peaks([[1.0, 1.0, 1.0, 1.0]])
    assert mask_list(ground_truth_mask(equal, 0.5)) == [[True, True, False, False]]
    assert mask_list(ground_truth_mask(equal, 0.75)) == [[True, True, True, False]]


def test_cumulative_boundary_is_inclusive():
    # shares 0.5, 0.3, 0.2: cumsum 0.5, 0.8, 1.0. r = 0.8 keeps the second (cumsum == r is not > r + 1e-6)
    acts = activations_with_peaks([[5.0, 3.0, 2.0]])
    assert mask_list(ground_truth_mask(acts, 0.8)) == [[True, True, False]]
    assert mask_list(ground_truth_mask(acts, 0.79)) == [[True, False, False]]


def test_all_zero_sample_keeps_nothing_and_makes_no_nan():
    acts = torch.zeros(2, 4, 3, 3)
    acts[1, 2, 0, 0] = 1.0
    thresholds = keep_thresholds(acts.abs().amax(dim=(2, 3)))
    assert not torch.isnan(thresholds).any()
    assert torch.isinf(thresholds[0]).all()
    for r in (0.1, 0.9, 1.0):
        mask = ground_truth_mask(acts, r)
        assert mask.dtype == torch.bool and mask.shape == (2, 4)
        assert mask_list(mask) == [[False] * 4, [False, False, True, False]]


def test_single_dominant_channel_is_always_kept():
    acts = activations_with_peaks([[0.1, 10.0, 0.1], [0.0, 0.0, 7.0]])
    for r in (1e-6, 0.01, 0.5, 0.95):  # its share (0.98, 1.0) exceeds every r here
        assert mask_list(ground_truth_mask(acts, r)) == [[False, True, False], [False, False, True]]


@pytest.mark.parametrize("r", [0.0, -0.1, 1.0001, 2.0, math.nan, math.inf])
def test_ratio_outside_unit_interval_raises(r):
    acts = torch.rand(1, 3, 2, 2)
    with pytest.raises(ValueError):
        ground_truth_mask(acts, r)
    with pytest.raises(ValueError):
        CumulativeMassTarget(r)
    with pytest.raises(ValueError):
        make_target("topk", r)


def test_unknown_target_kind_raises():
    with pytest.raises(ValueError, match="unknown target kind"):
        make_target("random", 0.5)


def test_thresholds_and_masks_agree_with_a_per_channel_reference_at_many_r():
    g = torch.Generator().manual_seed(7)
    response = torch.rand(40, 12, generator=g) ** 3  # skewed, like real GMP responses
    response[response < 0.02] = 0.0  # dead channels
    response[3] = 0.0  # an all-zero sample
    response[5, :4] = response[5, 4]  # ties
    thresholds = keep_thresholds(response)
    for r in [i / 50 for i in range(1, 51)] + [0.123, 0.999, 1.0]:
        expected = [reference_algorithm1(row, r) for row in response.tolist()]
        assert mask_list(CumulativeMassTarget(r).mask(response)) == expected, r
        assert mask_list(thresholds <= r + EPS) == expected, r


def test_masks_are_monotone_in_r():
    response = torch.rand(16, 20, generator=torch.Generator().manual_seed(1))
    previous = torch.zeros_like(response, dtype=torch.bool)
    for r in [i / 20 for i in range(1, 21)]:
        mask = CumulativeMassTarget(r).mask(response)
        assert bool((mask | ~previous).all()), "a channel kept at a smaller r was dropped at a larger one"
        previous = mask
    assert previous.all()  # no zero responses: r = 1 keeps everything


def test_topk_keeps_a_fixed_fraction_highest_first():
    acts = activations_with_peaks([[1.0, 5.0, 3.0, 2.0], [4.0, 0.0, 0.0, 1.0]])
    assert mask_list(topk_mask(acts, 0.5)) == [[False, True, True, False], [True, False, False, True]]
    assert mask_list(topk_mask(acts, 0.25)) == [[False, True, False, False], [True, False, False, False]]
    # ceil(0.3 · 4) = 2 channels; ties by index
    assert mask_list(TopKTarget(0.3).mask(torch.ones(1, 4))) == [[True, True, False, False]]
    # never fewer than one channel, all of them at fraction 1
    assert TopKTarget(0.01).mask(torch.rand(3, 8)).sum(dim=1).tolist() == [1, 1, 1]
    assert TopKTarget(1.0).mask(torch.rand(3, 8)).all()
    assert make_target("topk", 0.5).name == "topk" and make_target("mass", 0.5).name == "mass"


@pytest.mark.parametrize("softmax", [True, False])
def test_decision_head_shapes_and_pooling(softmax):
    torch.manual_seed(0)
    head = DecisionHead(8, 16, HeadSpec(softmax=softmax))
    x = torch.randn(4, 8, 5, 7)
    logits = head(x)
    assert logits.shape == (4, 16)
    assert head.macs == 8 * 16
    pooled = x.amax(dim=(2, 3))
    expected = head.proj(pooled.softmax(dim=1) if softmax else pooled)
    torch.testing.assert_close(logits, expected)
    # softmax over channels makes the head blind to a constant shift of its input; without it, not
    shifted = head(x + 3.0)
    assert torch.allclose(shifted, logits, atol=1e-5) == softmax


def test_head_average_pool_and_offset():
    torch.manual_seed(0)
    head = DecisionHead(8, 16, HeadSpec(pool="avg", softmax=False))
    x = torch.randn(4, 8, 5, 7)
    torch.testing.assert_close(head(x), head.proj(x.mean(dim=(2, 3))))
    # the calibration offset shifts every logit of its filter, and lives in the state dict
    head.logit_offset[3] = 2.5
    torch.testing.assert_close(head(x)[:, 3], head.proj(x.mean(dim=(2, 3)))[:, 3] + 2.5)
    assert "logit_offset" in head.state_dict()
    with pytest.raises(ValueError, match="head pool"):
        HeadSpec(pool="median")


def test_head_norm_standardises_training_batches_and_folds_at_inference():
    torch.manual_seed(0)
    head = DecisionHead(8, 16, HeadSpec(norm=True))
    x = torch.rand(64, 8, 5, 5) * torch.linspace(0.1, 3, 8)[None, :, None, None]
    head.train()
    for _ in range(200):  # running statistics converge to this distribution
        head(x)
    standardised = head.norm(head.pooled(x))
    torch.testing.assert_close(standardised.mean(0), torch.zeros(8), atol=1e-4, rtol=0)
    head.eval()
    head.logit_offset.fill_(0.7)
    weight, bias = head.folded()
    torch.testing.assert_close(head(x), head.pooled(x) @ weight.T + bias, atol=1e-5, rtol=1e-5)


def test_head_spec_meta_round_trip_and_old_checkpoints():
    spec = HeadSpec(pool="avg", softmax=False, norm=True)
    assert HeadSpec.from_meta(spec.to_meta()) == spec
    assert HeadSpec.from_meta({"head_softmax": False}) == HeadSpec(softmax=False)  # written before pool/norm existed
    assert HeadSpec().label == "" and spec.label == "avg-pool no-softmax head-norm"


def test_binarize_hard_forward_and_sigmoid_gradient():
    logits = torch.tensor([-2.0, -0.1, 0.0, 0.3, 5.0], requires_grad=True)
    hard = binarize(logits)
    assert hard.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]  # sigmoid(0) = 0.5 is not > 0.5
    assert not hard.requires_grad  # no gradient without the straight-through estimator

    ste = binarize(logits, straight_through=True)
    assert torch.equal(ste.detach(), hard)
    ste.sum().backward()
    s = torch.sigmoid(logits.detach())
    torch.testing.assert_close(logits.grad, s * (1 - s))
