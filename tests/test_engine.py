"""The sparse engine computes exactly what the masked dense model computes: on toy ResNet, VGG and
depthwise models with generated inputs at 32 and 224 (always), and on real CIFAR images when present."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from ftwt_cli import engine as engine_mod
from ftwt_cli.core.flops import FlopsCounter
from ftwt_cli.core.gating import FTWTModel
from ftwt_cli.core.heads import DecisionHead, HeadSpec
from ftwt_cli.engine import build_engine, folded_dense
from ftwt_cli.engine.latency import latency_report
from ftwt_cli.io import loading
from ftwt_cli.io.config import PROFILE_DIR, resolve
from ftwt_cli.models import REGISTRY, create_model

MINI = Path(os.environ.get("FTWT_CIFAR10_MINI", Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-mini"))
CIFAR_MODELS = [name for name, entry in REGISTRY.items() if entry.family == "cifar"]
QUICKSTART = PROFILE_DIR / "checkpoints" / "quickstart-dense.pt"



@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Four cifar10-mini test images with the standard CIFAR normalisation."""
    if not MINI.is_dir():
        pytest.skip(f"real test images not found at {MINI}")
    test = loading.dataset(resolve(None, data=f"imagefolder:{MINI}"), "test")
    return torch.stack([test[i][0] for i in (0, 250, 500, 750)])


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, so that folding them into the convs is actually exercised."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(c, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(c, generator=g))
    return model


def gated(backbone: nn.Module, size: int = 32) -> FTWTModel:
    """Wrap with heads whose masks keep about half the channels and vary from sample to sample."""
    torch.manual_seed(0)
    model = FTWTModel(backbone, (size, size))
    for head in model.heads():
        # The head sees a softmax (entries ~1/C): scale weights by C so the logits spread around 0.
        nn.init.normal_(head.proj.weight, std=2 * math.sqrt(head.proj.in_features))
        nn.init.zeros_(head.proj.bias)
    return model.eval().configure(mask_source="predicted", record=True)


def check_equivalent(model: FTWTModel, images: torch.Tensor, fit_images: torch.Tensor | None = None, **engine_kwargs):
    with torch.no_grad():
        expected = model(images)
    masks = [r.mask.bool() for r in model.records()]
    kept = torch.cat([m.float().mean(dim=1) for m in masks]).mean().item()
    assert 0.15 < kept < 0.85, f"test heads should keep about half the channels, kept {kept:.2f}"
    assert any(not torch.equal(m[0], m[1]) for m in masks), "masks should vary per sample"
    engine = build_engine(model, **engine_kwargs)
    if fit_images is not None:
        engine.fit_layout(fit_images)
    for i, image in enumerate(images):  # batch 1, image by image: the engine's masks are the model's
        assert (engine(image[None]) - expected[i : i + 1]).abs().max().item() < 1e-4
        for engine_mask, model_mask in zip(engine.block_masks(), masks):
            assert torch.equal(engine_mask, model_mask[i])
    got = engine(images)  # the whole batch at once: grouped by channel set per layer
    assert (got - expected).abs().max().item() < 1e-4
    if engine.fallback is None:
        for engine_masks, model_masks in zip(engine.batch_masks(), masks):
            assert torch.equal(engine_masks, model_masks)
    return engine


def run_one_by_one(engine, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([engine(image[None]) for image in images])


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_engine_matches_masked_model(name, images):
    check_equivalent(gated(randomize_bn(create_model(name, 10))), images)


@pytest.mark.skipif(not QUICKSTART.is_file(), reason=f"quickstart checkpoint {QUICKSTART} not built yet")
def test_engine_matches_quickstart_model(images):
    cfg = resolve("quickstart")
    dense = loading.load_model(cfg, str(QUICKSTART), require="dense").model
    check_equivalent(gated(dense), images)


@pytest.mark.parametrize("name", ["smallnet", "resnet20", "mobilenetv1"])
def test_dense_backbone_is_the_identity_case(name, images):
    backbone = randomize_bn(create_model(name, 10)).eval()
    with torch.no_grad():
        expected = backbone(images)
        folded = folded_dense(backbone, (32, 32))(images)
    assert (folded - expected).abs().max().item() < 1e-4
    assert (build_engine(backbone, (32, 32))(images) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("gather_cost", [0.0, 1e12])
def test_sliced_and_masked_dense_paths_agree(gather_cost, images):
    """0: every conv slices its weights; huge: every conv runs masked dense and selects its filters."""
    check_equivalent(gated(randomize_bn(create_model("smallnet", 10))), images, gather_cost_macs=gather_cost)


def test_weight_cache_hits_repeated_masks_and_respects_its_budget(images):
    model = gated(randomize_bn(create_model("smallnet", 10)))
    engine = build_engine(model, cache_mb=64.0)
    first = run_one_by_one(engine, images)
    misses = engine.cache.lookups - engine.cache.hits
    assert misses > 0
    second = run_one_by_one(engine, images)  # same images, same masks: every lookup now hits
    assert torch.equal(first, second)
    assert engine.cache.lookups - engine.cache.hits == misses
    tiny = build_engine(model, cache_mb=0.01)
    assert torch.allclose(run_one_by_one(tiny, images), first, atol=1e-6)
    assert 0 < tiny.cache.used <= tiny.cache.budget


def test_latency_report_measures_flops_from_predicted_masks(images):
    model = gated(randomize_bn(create_model("smallnet", 10)))
    threads = torch.get_num_threads()
    report = latency_report(model, images, threads=1, cache_mb=8.0, warmup=1)
    assert torch.get_num_threads() == threads
    for key in ("samples", "threads", "dense_ms", "engine_ms", "latency_reduction_pct", "flops_reduction_pct", "ratio", "cache_hit_rate"):
        assert key in report
    assert report["samples"] == len(images) and report["dense_ms"] > 0 and report["engine_ms"] > 0
    with torch.no_grad():
        model(images)
    counter = FlopsCounter(model.graph)
    expected = counter.reduction_pct(counter.macs_from_masks([r.mask for r in model.records()]).mean().item(), with_heads=True)
    assert report["flops_reduction_pct"] == pytest.approx(float(expected), abs=1e-6)
    assert report["ratio"] == pytest.approx(report["latency_reduction_pct"] / report["flops_reduction_pct"])
    dense = latency_report(create_model("smallnet", 10).eval(), images[:2], warmup=0)
    assert dense["flops_reduction_pct"] == 0.0 and math.isnan(dense["ratio"])


@pytest.mark.parametrize(
    ("name", "strategy"),
    [(name, strategy) for name in ("smallnet", "resnet20") for strategy in engine_mod.STRATEGIES]
    + [("mobilenetv1", "auto"), ("mobilenetv1", "core")],
)
def test_every_strategy_gives_the_same_logits(name, strategy, images):
    """Forced paths (and auto, with a static core fitted on 2 of the 4 images) all equal the masked model."""
    model = gated(randomize_bn(create_model(name, 10)))
    for cache_mb in (0.0, 64.0):
        engine = check_equivalent(model, images, fit_images=images[:2], strategy=strategy, cache_mb=cache_mb)
        counts = engine.strategy_counts()
        if strategy in ("slice", "rows", "dense", "core") and name != "mobilenetv1":
            assert counts[strategy if strategy in ("dense", "core") else f"{strategy}_miss"] > 0, counts


def test_core_path_handles_filters_and_inputs_outside_the_core(images):
    """A core fitted on one image misses filters and inputs other images use: extras are sliced and
    merged, calls with inputs outside the core fall back to slicing; logits stay exact."""
    model = gated(randomize_bn(create_model("resnet20", 10)))
    engine = build_engine(model, cache_mb=0.0, strategy="core")
    fitted = engine.fit_layout(images[:1], threshold=0.9)
    assert fitted["layers_with_core"] > 0 and 0 < fitted["mean_core_mac_fraction"] < 1
    with torch.no_grad():
        expected = model(images)
    assert (run_one_by_one(engine, images) - expected).abs().max().item() < 1e-4
    counts = engine.strategy_counts()
    assert counts["core"] > 0 and counts["core_extra"] > 0 and counts["slice_miss"] > 0, counts


def test_calibrated_cost_model_stays_exact(images):
    model = gated(randomize_bn(create_model("resnet20", 10)))
    engine = check_equivalent(model, images, fit_images=images[:2], calibrate=True)
    costs = [step.costs for _, step in engine.convs if step.costs]
    assert costs and all(c["t_full"] > 0 and c["conv_per_mac"] >= 0 for c in costs)


def test_kernel_floor_reports_sliced_conv_bound(images):
    from ftwt_cli.engine.latency import kernel_floor

    model = gated(randomize_bn(create_model("smallnet", 10)))
    floor = kernel_floor(model, images[:2], reps=1)
    assert floor["samples"] == 2 and floor["conv_dense_ms"] > 0 and floor["conv_sliced_ms"] > 0
    assert 0 < floor["conv_mac_reduction_pct"] < 100
    assert floor["floor_ratio_with_heads"] <= floor["floor_ratio_no_heads"]


# -- toy models on generated inputs (no data files needed) -------------------------------------------


def toy_resnet() -> nn.Module:
    """torchvision BasicBlocks (identity and downsampling shortcuts) behind a strided stem."""
    from torchvision.models.resnet import BasicBlock

    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
        BasicBlock(8, 8), BasicBlock(8, 16, stride=2, downsample=down), BasicBlock(16, 16),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def toy_vgg() -> nn.Module:
    def conv(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        *conv(8, 16), nn.MaxPool2d(2), *conv(16, 16), *conv(16, 24), nn.MaxPool2d(2),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(24, 10),
    )


def toy_depthwise() -> nn.Module:
    """torchvision MobileNetV2 inverted residuals (ReLU6, depthwise 3×3, linear bottleneck)."""
    from torchvision.models.mobilenetv2 import InvertedResidual

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
        InvertedResidual(8, 8, 1, 2), InvertedResidual(8, 16, 2, 3), InvertedResidual(16, 16, 1, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


TOYS = {"resnet": toy_resnet, "vgg": toy_vgg, "depthwise": toy_depthwise}


def toy(name: str, size: int) -> FTWTModel:
    torch.manual_seed(0)
    return gated(randomize_bn(TOYS[name]()), size)


def noise_images(size: int, n: int = 3) -> torch.Tensor:
    """Noise with a per-image, per-channel scale and offset, so that peaks (and masks) differ between images."""
    g = torch.Generator().manual_seed(size)
    scale, shift = 3 * torch.rand(n, 3, 1, 1, generator=g), torch.randn(n, 3, 1, 1, generator=g)
    return torch.randn(n, 3, size, size, generator=g) * scale + shift


def layer_choices(engine, choice: str):
    if choice == "mixed":
        return [i % 2 == 0 for i in range(len(engine.convs))]
    return choice


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("name", sorted(TOYS))
@pytest.mark.parametrize("choice", ["sparse", "mixed", "dense"])
def test_toy_models_are_exact_for_every_layer_choice(name, size, choice):
    model = toy(name, size)
    images = noise_images(size)
    probe = build_engine(model, cache_mb=0.0)
    engine = check_equivalent(model, images, layers=layer_choices(probe, choice), cache_mb=8.0)
    flags = [step.sparse for step in engine.steps]
    assert flags == ([True] * len(flags) if choice == "sparse" else [False] * len(flags) if choice == "dense" else layer_choices(engine, "mixed"))
    assert engine.sparse_layers() == [s.name for s in engine.steps if s.sparse]
    counts = engine.strategy_counts()
    if choice == "dense":  # no sparse path ran: only full convs or dense-then-select
        assert counts["dense"] > 0 and counts["slice_miss"] == counts["rows_miss"] == counts["core"] == 0, counts


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("name", sorted(TOYS))
def test_whole_engine_fallback_is_exact(name, size):
    """The dense fallback (BN folded, the heads' masks applied) gives the gated model's logits and masks."""
    model = toy(name, size)
    images = noise_images(size)
    engine = check_equivalent(model, images, fallback=True)
    assert engine.fallback is not None and engine.sparse_layers() == []


def test_measured_choice_reports_every_layer_and_stays_exact():
    model = toy("resnet", 32)
    images = noise_images(32, 4)
    engine = check_equivalent(model, images, calibration_images=images[:2])
    report = engine.measurement
    assert report["images"] == 2 and len(report["layers"]) == len(engine.convs)
    for entry, step in zip(report["layers"], engine.steps):
        assert entry["name"] == step.name and entry["sparse"] == step.sparse
        assert entry["sparse_us"] > 0 and entry["dense_us"] > 0 and 0 <= entry["keep"] <= 1
    assert report["engine_ms"] > 0 and report["dense_ms"] > 0
    assert (engine.fallback is not None) == report["fallback"]
    # Measuring left no trace in the counters or the cache.
    fresh = build_engine(model, cache_mb=64.0)
    run_one_by_one(fresh, images)
    fresh(images)
    assert engine.cache.lookups <= fresh.cache.lookups


def test_per_layer_decision_follows_the_measured_times(monkeypatch):
    """With timings forced (sparse faster on even layers), exactly those layers run sparse; a layer
    whose every call is the full conv has nothing to choose and stays dense."""
    from ftwt_cli.engine import choice

    model = toy("vgg", 32)
    with torch.no_grad():
        model.heads()[0].proj.bias.fill_(1e6)  # the first layer keeps every filter of the full image
    engine = build_engine(model, cache_mb=0.0)
    position = {id(step): i for i, step in enumerate(engine.steps)}

    def forced(step, samples, reps):
        return (1.0, 2.0) if position[id(step)] % 2 == 0 else (2.0, 1.0)

    monkeypatch.setattr(choice, "_layer_times", forced)
    images = noise_images(32)
    report = engine.measure(images, whole=False)
    expected = [i % 2 == 0 for i in range(len(engine.steps))]
    expected[0] = False
    assert [e["sparse"] for e in report["layers"]] == expected == [s.sparse for s in engine.steps]
    assert report["layers"][0]["keep"] == 1.0 and "fallback" not in report
    with torch.no_grad():
        assert (engine(images) - model(images)).abs().max().item() < 1e-4


def test_measure_needs_calibration_images():
    with pytest.raises(ValueError, match="calibration_images"):
        build_engine(toy("vgg", 32), layers="measure")
    with pytest.raises(ValueError, match="flags"):
        build_engine(toy("vgg", 32), layers=[True])


@pytest.mark.parametrize("spec", [HeadSpec("max"), HeadSpec("avg"), HeadSpec("max", norm=True), HeadSpec("avg", softmax=False, norm=True)])
def test_head_options_and_offsets_change_engine_masks_like_the_model(spec):
    model = toy("resnet", 32)
    images = noise_images(32, 4)
    with torch.no_grad():
        model(images)
    before = [r.mask.bool().clone() for r in model.records()]
    g = torch.Generator().manual_seed(3)
    for block in model.blocks:
        head = DecisionHead(block.conv.in_channels, block.conv.out_channels, spec)
        head.logit_offset.copy_(3.0 * torch.randn(head.proj.out_features, generator=g))
        if head.norm is not None:  # running statistics the engine must fold into the 1×1 conv
            head.norm.running_mean.copy_(torch.rand(head.proj.in_features, generator=g))
            head.norm.running_var.copy_(0.5 + torch.rand(head.proj.in_features, generator=g))
        block.head = head.eval()
    with torch.no_grad():
        model(images)
    after = [r.mask.bool() for r in model.records()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "the offsets should change some masks"
    for choice in ("sparse", "dense"):
        engine = build_engine(model, layers=choice)
        for i, image in enumerate(images):
            with torch.no_grad():
                got, expected = engine(image[None]), model(image[None])
            assert (got - expected).abs().max().item() < 1e-4
            for engine_mask, model_mask in zip(engine.block_masks(), after):
                assert torch.equal(engine_mask, model_mask[i])
