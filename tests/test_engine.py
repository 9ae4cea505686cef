"""The routing engine computes what the gated model computes: toy ResNet, VGG and depthwise models at 32
and 224, codebook models routed (batch 1 and grouped batches), with and without oneDNN's pre-packed
ops, free-mask models and dense backbones run exactly; every sub-conv is built once."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ftwt_cli.core.gating import FTWTModel
from ftwt_cli.core.heads import DecisionHead, HeadSpec
from ftwt_cli.engine import SubConv, build_engine, folded_dense, packing_available
from ftwt_cli.models import create_model

PACKS = [True, False] if packing_available() else [False]


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


def gated(backbone: nn.Module, size: int = 32, k: int | None = 3) -> FTWTModel:
    """Heads whose logits spread around 0; with ``k``, a codebook of ``k`` random prototypes per block
    (each keeping about half its filters) so that images route differently."""
    torch.manual_seed(0)
    model = FTWTModel(backbone, (size, size))
    for head in model.heads():
        # The head sees a softmax (entries ~1/C): scale weights by C so the logits spread around 0.
        nn.init.normal_(head.proj.weight, std=2 * math.sqrt(head.proj.in_features))
        nn.init.zeros_(head.proj.bias)
    if k is not None:
        g = torch.Generator().manual_seed(2)
        model.set_codebooks([torch.rand(k, b.conv.out_channels, generator=g) < 0.5 for b in model.blocks])
    return model.eval().configure(mask_source="predicted", record=True)


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


def toy_grouped() -> nn.Module:
    """A grouped (not depthwise) conv between routed blocks, as in ResNeXt and RegNet."""

    def block(i, o, groups=1):
        return [nn.Conv2d(i, o, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(3, 16), nn.MaxPool2d(2), *block(16, 32, groups=4), *block(32, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)
    )


TOYS = {"resnet": toy_resnet, "vgg": toy_vgg, "depthwise": toy_depthwise, "grouped": toy_grouped}


def toy(name: str, size: int, k: int | None = 3) -> FTWTModel:
    torch.manual_seed(0)
    return gated(randomize_bn(TOYS[name]()), size, k)


def noise_images(size: int, n: int = 6) -> torch.Tensor:
    """Noise with a per-image, per-channel scale and offset, so that peaks (and masks) differ between images."""
    g = torch.Generator().manual_seed(size)
    scale, shift = 3 * torch.rand(n, 3, 1, 1, generator=g), torch.randn(n, 3, 1, 1, generator=g)
    return torch.randn(n, 3, size, size, generator=g) * scale + shift


def check_exact(model: FTWTModel, images: torch.Tensor, pack: bool):
    """Batch 1 image by image and the whole batch (grouped by prototype): the gated model's logits and masks."""
    with torch.no_grad():
        expected = model(images)
    masks = [r.mask.bool() for r in model.records()]
    engine = build_engine(model, pack=pack)
    scale = expected.abs().max().item()
    for i, image in enumerate(images):
        assert (engine(image[None]) - expected[i : i + 1]).abs().max().item() <= 1e-5 * max(scale, 1.0)
        for engine_mask, model_mask in zip(engine.block_masks(), masks):
            assert torch.equal(engine_mask, model_mask[i])
    assert (engine(images) - expected).abs().max().item() <= 1e-5 * max(scale, 1.0)
    for engine_masks, model_masks in zip(engine.batch_masks(), masks):
        assert torch.equal(engine_masks, model_masks)
    return engine, masks


@pytest.mark.parametrize("pack", PACKS)
@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("name", sorted(TOYS))
def test_routed_toy_models_are_exact(name, size, pack):
    model = toy(name, size)
    engine, masks = check_exact(model, noise_images(size), pack)
    assert engine.routed
    assert any(len(torch.unique(m, dim=0)) > 1 for m in masks), "images should route to different prototypes"
    assert all(s.packed == (pack and packing_available()) for step in engine.steps.values() for row in step.sub for s in row if s.groups)


@pytest.mark.parametrize("name", sorted(TOYS))
def test_free_masks_run_exactly_on_dense_convs(name):
    model = toy(name, 32, k=None)
    engine, masks = check_exact(model, noise_images(32), pack=PACKS[0])
    assert not engine.routed
    assert any(not torch.equal(m[0], m[1]) for m in masks), "free masks should vary per image"


@pytest.mark.parametrize("name", ["smallnet", "resnet20", "mobilenetv1", "vgg16_bn"])
def test_dense_backbone_is_the_prepacked_reference(name):
    backbone = randomize_bn(create_model(name, 10)).eval()
    images = noise_images(32, 3)
    with torch.no_grad():
        expected = backbone(images)
        folded = folded_dense(backbone, (32, 32))(images)
    assert (folded - expected).abs().max().item() < 1e-4
    engine = build_engine(backbone, (32, 32))
    assert not engine.routed and engine.subconv_count() == sum(isinstance(m, nn.Conv2d) for m in backbone.modules())
    assert (engine(images) - expected).abs().max().item() < 1e-4 * max(1.0, expected.abs().max().item())


def test_subconvs_are_built_once_and_counted():
    model = toy("resnet", 32, k=4)
    before = SubConv.builds
    engine = build_engine(model)
    built = SubConv.builds - before
    assert built == engine.subconv_count() == sum(s.plan.subconvs for s in engine.steps.values())
    # A conv reading another routed conv has K_in × K sub-convs; one reading the dense stream, K.
    assert {s.plan.subconvs for s in engine.steps.values() if s.plan.mode == "routed"} == {4, 16}
    images = noise_images(32, 8)
    for image in images:
        engine(image[None])
    engine(images)
    assert SubConv.builds - before == built, "running must not build sub-convs"
    assert engine.subnet_memory_mb() > 0


def test_activations_fuse_into_the_convs_they_follow():
    engine = build_engine(toy("resnet", 32))
    fused = {s.plan.name: s.plan.activation for s in engine.steps.values()}
    assert fused["0"] is not None  # stem conv → BN → ReLU
    assert fused["4.conv1"] is not None and fused["4.conv2"] is None  # conv2 feeds the residual add


@pytest.mark.parametrize("spec", [HeadSpec("max"), HeadSpec("avg"), HeadSpec("max", norm=True), HeadSpec("avg", softmax=False, norm=True)])
def test_head_options_and_offsets_route_like_the_model(spec):
    model = toy("resnet", 32)
    g = torch.Generator().manual_seed(3)
    for block in model.blocks:
        head = DecisionHead(block.conv.in_channels, block.conv.out_channels, spec)
        nn.init.normal_(head.proj.weight, std=2 * math.sqrt(head.proj.in_features))
        head.logit_offset.copy_(3.0 * torch.randn(head.proj.out_features, generator=g))
        if head.norm is not None:  # running statistics the engine must fold into its scorer
            head.norm.running_mean.copy_(torch.rand(head.proj.in_features, generator=g))
            head.norm.running_var.copy_(0.5 + torch.rand(head.proj.in_features, generator=g))
        block.head = head.eval()
    check_exact(model, noise_images(32), PACKS[0])


def test_a_mixed_codebook_is_refused():
    model = toy("vgg", 32)
    model.blocks[0].codebook = None
    with pytest.raises(ValueError, match="codebook"):
        build_engine(model)


class _RescaledHead(DecisionHead):
    """A variant whose logits are not the paper head's affine form: the router scores its own logits."""

    def logits(self, pooled):
        return self.proj(pooled * pooled.shape[1]) + self.logit_offset


def test_a_head_variant_without_a_closed_form_routes_through_its_own_logits():
    model = toy("resnet", 32)
    for block in model.blocks:
        head = _RescaledHead(block.conv.in_channels, block.conv.out_channels)
        nn.init.normal_(head.proj.weight, std=2.0)
        block.head = head.eval()
    engine, masks = check_exact(model, noise_images(32), PACKS[0])
    assert not any(step.router.affine for step in engine.blocks)


def test_the_kernel_follows_the_size_of_the_convs():
    """Pre-packed oneDNN where convs are large (224-pixel ResNets), F.conv2d where per-call cost dominates."""
    from ftwt_cli.engine.kernels import PACKED_MIN_MACS, packing_pays

    small, large = nn.Conv2d(16, 16, 3), nn.Conv2d(256, 256, 3)
    assert not packing_pays([(small, (32, 32))])
    assert packing_pays([(large, (28, 28))]) == packing_available()
    assert 256 * 256 * 9 * 28 * 28 >= PACKED_MIN_MACS > 16 * 16 * 9 * 32 * 32
    engine = build_engine(toy("resnet", 32))  # tiny convs: the default format, F.conv2d
    assert not engine.channels_last and not any(s.packed for step in engine.steps.values() for row in step.sub for s in row)


class _Scaled(nn.Module):
    """A block whose forward reads a parameter of a submodule (an fx get_attr node with a dotted path)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Module()
        self.inner.scale = nn.Parameter(torch.full((1, 8, 1, 1), 0.5))
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) * self.inner.scale


def test_a_parameter_read_in_forward_reaches_the_engine():
    backbone = nn.Sequential(_Scaled(), nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))  # fmt: skip
    check_exact(gated(randomize_bn(backbone)), noise_images(32), PACKS[0])


class _Broadcast(nn.Module):
    """A sum whose first operand is broadcast to the second's shape (attention biases, as in MaxViT)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        bias = y.mean(dim=1, keepdim=True)  # [N, 1, H, W], read by nothing after the add
        return bias + y


def test_a_broadcasting_add_is_not_done_in_place():
    backbone = nn.Sequential(_Broadcast(), nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))  # fmt: skip
    check_exact(gated(randomize_bn(backbone), k=None), noise_images(32), PACKS[0])
