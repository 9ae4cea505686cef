"""Pre-sliced sub-networks: prototype covers, the uncovered fallback, grouped batches, the memory cap,
the checkpoint round trip and codebooks, each exact against the gated model (toy ResNet, VGG and
depthwise models at 32 and 224, both memory formats)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_engine import check_equivalent, noise_images, toy

from ftwt_cli.engine import batched, build_engine
from ftwt_cli.engine.batched import Grouped, grouped_add
from ftwt_cli.engine.compact import Compact
from ftwt_cli.engine.fitting import gated_steps
from ftwt_cli.engine.prototypes import Prototypes, from_lists, merge_levels
from ftwt_cli.engine.subconv import SubConv, packing_available
from ftwt_cli.engine.throughput import batched_throughput
from ftwt_cli.io.checkpoint import load_checkpoint, save_checkpoint

CASES = [(name, size) for name in ("resnet", "vgg", "depthwise") for size in (32, 224)]


def model_masks(model, images: torch.Tensor) -> list[np.ndarray]:
    """Per block, the gated model's masks bool [N, C] on ``images``."""
    with torch.no_grad():
        model(images)
    return [r.mask.bool().numpy() for r in model.records()]


def lists_for(model, sets_per_block) -> dict:
    """Plain-list prototypes naming each block's conv (the engine's step names)."""
    names = [spec.conv for spec in model.graph.blocks]
    return {
        "format": 1,
        "layers": {name: {"width": sets[0].size, "sets": [np.flatnonzero(s).tolist() for s in sets]} for name, sets in zip(names, sets_per_block) if sets},
    }


def test_cover_picks_the_cheapest_superset_by_bit_test():
    sets = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=bool)
    table = Prototypes(sets)
    masks = np.array([[1, 0, 0, 0, 0], [1, 0, 1, 0, 0], [0, 0, 0, 0, 1], [1, 0, 0, 0, 1]], dtype=bool)
    chosen = table.cover(masks)
    assert [table.sets[k].sum() if k >= 0 else -1 for k in chosen] == [2, 4, 3, -1]
    assert [table.cover_one(m) for m in masks] == chosen.tolist()  # the batch-1 bit test agrees
    wide = Prototypes(np.random.default_rng(1).random((5, 300)) < 0.8)  # more than one 64-bit word
    many = np.random.default_rng(2).random((40, 300)) < 0.3
    assert [wide.cover_one(m) for m in many] == wide.cover(many).tolist()
    for k, mask in zip(chosen, masks):
        if k >= 0:
            assert not (mask & ~table.sets[k]).any()


def test_merging_keeps_every_held_out_mask_inside_a_prototype():
    rng = np.random.default_rng(0)
    base = rng.random((3, 24)) < 0.4
    masks = base[rng.integers(0, 3, 40)]
    levels = merge_levels(masks)
    assert len(levels[4]) >= 3  # the three distinct masks are leaves
    for leaves, sets in levels.items():
        covered = Prototypes(np.stack(sets)).cover(masks) if sets else -np.ones(len(masks))
        assert (covered >= 0).all() or leaves == 1, leaves
        assert all(not s.all() for s in sets)  # the full set needs no prototype


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("name", "size"), CASES)
def test_prototype_cover_with_extra_channels_and_the_uncovered_fallback_are_exact(name, size, channels_last):
    """Image 0's masks plus one extra channel are the prototypes: image 0 runs them (the extra channel
    computed and zeroed), images whose masks leave them take the per-call paths; all exact."""
    model = toy(name, size)
    images = noise_images(size, 4)
    masks = model_masks(model, images)
    sets = []
    for m in masks:
        proto = m[0].copy()
        proto[np.flatnonzero(~proto)[:1]] = True
        sets.append([proto] if not proto.all() else [])
    lists = lists_for(model, sets)
    engine = check_equivalent(model, images, prototypes=lists, cache_mb=0.0, layers="sparse", fallback=False, channels_last=channels_last)
    counts = engine.strategy_counts()
    assert counts["proto"] > 0 and counts["uncovered"] > 0, counts
    assert sum(s.extra_macs for s in engine.steps) > 0
    assert engine.channels_last is channels_last


@pytest.mark.parametrize("call_cost", [0.0, batched.CALL_COST_MACS])
@pytest.mark.parametrize(("name", "size"), CASES)
def test_grouped_batches_split_by_prototype_stay_exact(name, size, call_cost, monkeypatch):
    """Two prototypes per layer (images 0 ∪ 1 and 2 ∪ 3). With free conv calls a batch splits into a
    group per prototype at every gated conv and the residual adds regroup; with the real call cost it
    may run as one group on a prototype covering all. Outputs and every image's masks equal the gated
    model's either way."""
    monkeypatch.setattr(batched, "CALL_COST_MACS", call_cost)
    groups = []
    choose = batched.grouping
    monkeypatch.setattr(batched, "grouping", lambda step, x, masks: groups.append(len(np.unique(c := choose(step, x, masks)))) or c)
    model = toy(name, size)
    images = noise_images(size, 4)
    masks = model_masks(model, images)
    sets = [[s for s in (m[0] | m[1], m[2] | m[3]) if not s.all()] for m in masks]
    engine = check_equivalent(model, images, prototypes=lists_for(model, sets), cache_mb=0.0, layers="sparse", fallback=False)
    assert any(s.prototypes is not None and len(s.prototypes) == 2 for s in engine.steps), "some layer should hold both prototypes"
    if call_cost == 0.0:
        assert max(groups) >= 2, groups
    with torch.no_grad():
        batch = engine(images)
        singles = torch.cat([engine(image[None]) for image in images])
    assert (batch - singles).abs().max().item() < 1e-4


def test_grouped_add_regroups_operands_grouped_differently():
    torch.manual_seed(0)
    values = torch.randn(4, 6, 5, 5)
    full = Compact.of(values)
    a = Grouped([(np.array([0, 1, 2, 3]), full)], 4)
    low, high = np.zeros(6, dtype=bool), np.zeros(6, dtype=bool)
    low[:3], high[2:] = True, True
    b = Grouped(
        [(np.array([2, 0]), Compact.from_mask(values[[2, 0]][:, :3].clone(), low)), (np.array([3, 1]), Compact.from_mask(values[[3, 1]][:, 2:].clone(), high))],
        4,
    )  # fmt: skip
    out = grouped_add(a, b)
    dense = torch.zeros(4, 6, 5, 5)
    for rows, c in out.parts:
        dense[torch.from_numpy(rows)] = c.dense()
    expected = values.clone()
    expected[[0, 2], :3] += values[[0, 2], :3]
    expected[[1, 3], 2:] += values[[1, 3], 2:]
    assert torch.allclose(dense, expected)


@pytest.mark.parametrize(("name", "size"), CASES)
def test_fitted_prototypes_are_exact_and_reported(name, size):
    model = toy(name, size)
    held_out = noise_images(size, 6)[2:]
    images = noise_images(size + 1, 4)[:, :, :size, :size]  # other images than those fitted on
    engine = check_equivalent(model, images, prototype_images=held_out, cache_mb=8.0, layers="sparse", fallback=False)
    report = engine.prototype_report()
    assert report["fitted_on"] == 4 and report["source"] == "fitted"
    assert report["layers"] > 0 and report["prototypes"] >= report["layers"] and report["subconvs"] > 0
    assert 0.0 <= report["coverage"] <= 1.0 and report["calls"] > 0 and report["extra_mac_pct"] >= 0.0
    assert 0 < report["memory_mb"] <= report["memory_cap_mb"]


def test_memory_cap_is_respected_while_fitting_and_running():
    model = toy("resnet", 224)
    images = noise_images(224, 4)
    roomy = build_engine(model, prototype_images=images, layers="sparse", fallback=False)
    needed = roomy.memory.used
    assert needed > 0
    cap_mb = needed / 3 / 2**20
    engine = check_equivalent(model, images, prototype_images=images, memory_mb=cap_mb, cache_mb=0.0, layers="sparse", fallback=False)
    assert 0 < engine.memory.used <= engine.memory.budget == int(cap_mb * 2**20)
    assert sum(s.nbytes for step in engine.steps for s in step.subconvs.values()) == engine.memory.used
    assert engine.strategy_counts()["over_cap"] > 0  # calls whose sub-conv did not fit took the per-call paths
    with pytest.raises(ValueError, match="memory_mb"):
        build_engine(model, memory_mb=0)


def test_prototype_sets_round_trip_through_a_checkpoint(tmp_path):
    model = toy("vgg", 32)
    images = noise_images(32, 4)
    fitted = build_engine(model, prototype_images=images, layers="sparse", fallback=False)
    lists = fitted.prototype_lists()
    save_checkpoint(tmp_path / "m.pt", model, {"kind": "ftwt", "engine_prototypes": lists})
    meta = load_checkpoint(tmp_path / "m.pt")["meta"]  # read with weights_only=True: plain lists survive
    assert meta["engine_prototypes"] == lists
    loaded = check_equivalent(model, images, prototypes=meta["engine_prototypes"], layers="sparse", fallback=False)
    for a, b in zip(gated_steps(fitted), gated_steps(loaded)):
        assert (a.prototypes is None) == (b.prototypes is None)
        if a.prototypes is not None:
            assert np.array_equal(a.prototypes.sets, b.prototypes.sets) and b.prototypes.source == "checkpoint"


def test_malformed_prototype_lists_are_refused():
    model = toy("vgg", 32)
    name = model.graph.blocks[0].conv
    width = model.blocks[0].conv.out_channels
    with pytest.raises(ValueError, match="format"):
        from_lists({"layers": {}})
    with pytest.raises(ValueError, match=r"\[0, "):
        from_lists({"format": 1, "layers": {name: {"width": width, "sets": [[width]]}}})
    with pytest.raises(ValueError, match="no head"):
        build_engine(model, prototypes={"format": 1, "layers": {"nowhere": {"width": 4, "sets": [[0]]}}})
    with pytest.raises(ValueError, match="width"):
        build_engine(model, prototypes={"format": 1, "layers": {name: {"width": width + 1, "sets": [[0]]}}})


@pytest.mark.parametrize("name", ["resnet", "depthwise"])
def test_codebook_prototypes_are_used_as_they_are(name):
    """A checkpoint's codebook: every image's mask is one of its prototypes, so every gated call runs a
    pre-sliced sub-conv and no extra channel is computed."""
    model = toy(name, 32)
    images = noise_images(32, 4)
    g = torch.Generator().manual_seed(5)
    books = []
    for block in model.blocks:
        protos = torch.rand(8, block.conv.out_channels, generator=g) < 0.5
        protos[:, 0] = True  # never empty
        books.append(protos.float())
    model.set_codebooks(books)
    engine = check_equivalent(model, images, cache_mb=0.0, layers="sparse", fallback=False)
    assert engine.prototype_report()["coverage"] == 1.0
    for step in engine.steps:  # image by image, each runs its own prototype: nothing extra computed
        step.counts, step.extra_macs = dict.fromkeys(step.counts, 0), 0
    with torch.no_grad():
        for image in images:
            engine(image[None])
    report = engine.prototype_report()
    assert report["source"] == "codebook" and report["layers"] == len(model.blocks)
    assert report["coverage"] == 1.0 and report["extra_mac_pct"] == 0.0


def test_predefined_signature_counts_are_followed():
    model = toy("resnet", 32)
    counts = [max(1, b.conv.out_channels // 3) for b in model.blocks]
    model.configure(keep_counts=counts)
    images = noise_images(32, 4)
    engine = check_equivalent(model, images, fallback=False)
    assert all(int(m.sum()) == c for m, c in zip(engine.block_masks(), counts))
    check_equivalent(model, images, fallback=True)


@pytest.mark.skipif(not packing_available(), reason="oneDNN pre-packed convs not in this torch build")
def test_packed_and_plain_kernels_compute_the_same_sub_conv():
    model = toy("vgg", 224)
    engine = build_engine(model, layers="sparse", fallback=False)
    g = engine.steps[1].geometry
    sub = SubConv(g, np.arange(0, g.out_channels, 2), np.arange(1, g.in_per_group))
    x = torch.randn(2, sub.in_idx.size, *g.in_shape[2:])
    plain = sub.run(x)
    sub.prepare(False, choose_kernel=True)
    reference = F.conv2d(x, g.weight[::2][:, 1:], g.bias[::2], g.stride, g.padding)
    assert sub.kernel in ("conv2d", "packed")
    assert torch.allclose(sub.run(x), reference, atol=1e-4) and torch.allclose(plain, reference, atol=1e-4)


def test_batched_throughput_reports_every_batch_size():
    model = toy("resnet", 32)
    images = noise_images(32, 5)
    engine = build_engine(model, prototype_images=images[:3], layers="sparse", fallback=False)
    report = batched_throughput(engine, images, [2, 4], images_per_size=4)
    assert set(report) == {"2", "4"}
    for row in report.values():
        assert row["dense_images_per_s"] > 0 and row["engine_images_per_s"] > 0
        assert row["speedup"] == pytest.approx(row["engine_images_per_s"] / row["dense_images_per_s"])


def test_rounding_up_to_the_channel_block_adds_the_most_often_kept_channels():
    from ftwt_cli.engine.prototypes import round_up

    frequency = np.linspace(1.0, 0.0, 80)  # channel 0 kept most often
    short = np.zeros(80, dtype=bool)
    short[2:32] = True  # 30 channels: 2 short of 32
    grown = round_up([short, short.copy()], frequency, 16)
    assert len(grown) == 1 and grown[0].sum() == 32 and grown[0][short].all()
    assert sorted(set(np.flatnonzero(grown[0])) - set(np.flatnonzero(short))) == [0, 1]  # the most often kept
    far = np.zeros(80, dtype=bool)
    far[:20] = True  # 12 short of 32: rounding would cost too much, the set stays
    assert [s.sum() for s in round_up([far], frequency, 16)] == [20]
    nearly = np.ones(80, dtype=bool)
    nearly[0] = False
    assert round_up([nearly], frequency, 16) == []  # grown to the full set: no prototype needed
