"""The gating wrapper on every registry model and on user models given by file or import path."""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ftwt_cli.core.gating import FTWTModel, GatedBlock
from ftwt_cli.errors import BadInput
from ftwt_cli.models import REGISTRY, create_model

# conv→BN pairs per model: VGG 13; CIFAR ResNet 1 + 2 per basic block; MobileNetV1 1 + 2 × 13;
# torchvision ResNet 1 + 2 per block + downsample convs; MobileNetV2 1 + 2 + 3 × 16 + 1.
EXPECTED_BLOCKS = {
    "smallnet": 4,
    "vgg16_bn": 13,
    "resnet20": 19,
    "resnet56": 55,
    "mobilenetv1": 27,
    "resnet18": 20,
    "resnet34": 36,
    "mobilenet_v2": 52,
}


def test_expected_blocks_cover_the_registry():
    assert set(EXPECTED_BLOCKS) == set(REGISTRY)


def dense_and_gated(name: str, num_classes: int = 10) -> tuple[nn.Module, FTWTModel]:
    torch.manual_seed(0)
    dense = create_model(name, num_classes).eval()
    with torch.no_grad():  # non-trivial BN statistics, so BN is not the identity
        for m in dense.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    gated = FTWTModel(copy.deepcopy(dense), input_size_for_test(name)).eval()
    return dense, gated


def input_size_for_test(name: str) -> tuple[int, int]:
    """ImageNet models are fully convolutional up to global pooling: 64×64 finds the same blocks, faster."""
    return (32, 32) if REGISTRY[name].family == "cifar" else (64, 64)


@pytest.mark.parametrize("name", list(EXPECTED_BLOCKS))
def test_wrapper_gates_every_conv_bn_block_and_keeps_dense_logits(name):
    dense, gated = dense_and_gated(name)
    blocks = [m for m in gated.modules() if isinstance(m, GatedBlock)]
    assert len(gated.blocks) == len(blocks) == len(gated.graph.blocks) == EXPECTED_BLOCKS[name]
    # every BN now lives inside a gated block (the backbone's own slot became Identity)
    inside = {id(b.bn) for b in blocks}
    assert all(id(m) in inside for m in gated.modules() if isinstance(m, nn.BatchNorm2d))
    # heads map block input channels to block output channels
    assert all(b.head.proj.in_features == b.conv.in_channels for b in blocks)
    assert all(b.head.proj.out_features == b.conv.out_channels for b in blocks)

    x = torch.randn(2, 3, *input_size_for_test(name))
    with torch.no_grad():
        expected = dense(x)
        got = gated.configure(mask_source="dense", record=True)(x)
    assert torch.equal(got, expected)
    records = gated.records()
    assert len(records) == len(blocks)
    assert all(rec.mask is None and rec.response.shape == (2, b.conv.out_channels) for rec, b in zip(records, blocks))


def test_resnet_targets_first_conv_after_relu_second_before_the_residual_add():
    dense, gated = dense_and_gated("resnet20")
    names = [b.conv for b in gated.graph.blocks]
    first, second = names.index("layers.0.conv1"), names.index("layers.0.conv2")
    assert gated.graph.blocks[first].activation is F.relu
    assert gated.graph.blocks[second].activation is None

    seen = {}
    block = dense.layers[0]
    block.bn1.register_forward_hook(lambda m, i, o: seen.__setitem__("bn1", o.clone()))
    block.bn2.register_forward_hook(lambda m, i, o: seen.__setitem__("bn2", o.clone()))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        dense(x)
        gated.configure(mask_source="dense", record=True)(x)
    records = gated.records()
    after_relu = F.relu(seen["bn1"]).amax(dim=(2, 3))
    before_add = seen["bn2"].abs().amax(dim=(2, 3))
    torch.testing.assert_close(records[first].response, after_relu)
    torch.testing.assert_close(records[second].response, before_add)
    # the distinction matters: the BN outputs have negative peaks that ReLU would hide
    assert not torch.allclose(seen["bn2"].relu().amax(dim=(2, 3)), before_add)
    assert not torch.allclose(seen["bn1"].abs().amax(dim=(2, 3)), after_relu)


def test_second_conv_of_basic_block_is_masked_before_the_add():
    _, gated = dense_and_gated("resnet20")
    block = gated.backbone.layers[0]
    x = torch.randn(2, 16, 32, 32)
    gated.configure(mask_source="predicted")
    with torch.no_grad():
        nn.init.constant_(block.conv2.head.proj.bias, -10.0)  # head says: prune every channel
        nn.init.zeros_(block.conv2.head.proj.weight)
        out = block(x)
    # with the second conv's output masked away, the block is relu(shortcut(x))
    torch.testing.assert_close(out, F.relu(x))


USER_MODEL_SOURCE = textwrap.dedent(
    """
    from torch import nn


    def build(num_classes):
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU(),
            nn.Conv2d(8, 4, 1), nn.ReLU(),  # no BN: not a block
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes),
        )
    """
)


def check_user_model(model: nn.Module) -> None:
    model.eval()
    dense = copy.deepcopy(model)
    gated = FTWTModel(model, (16, 16)).eval()
    assert len(gated.blocks) == 2
    assert [b.conv for b in gated.graph.blocks] == ["0", "3"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(gated(x), dense(x))


def test_user_model_from_file(tmp_path):
    path = tmp_path / "my_tiny_model.py"
    path.write_text(USER_MODEL_SOURCE)
    model = create_model(f"{path}:build", 5)
    assert model[-1].out_features == 5
    check_user_model(model)


def test_user_model_from_package(tmp_path, monkeypatch):
    package = tmp_path / "ftwt_test_userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(USER_MODEL_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    check_user_model(create_model("ftwt_test_userpkg.nets:build", 3))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_model", "unknown model"),
        ("ftwt_no_such_pkg.nets:build", "could not import"),
        ("missing/file.py:build", "not found"),
        ("torch.nn:no_such_callable", "no callable"),
    ],
)
def test_bad_model_specs_are_bad_input(spec, message):
    with pytest.raises(BadInput, match=message):
        create_model(spec, 10)


def test_model_callable_must_return_a_module(tmp_path):
    path = tmp_path / "not_a_model.py"
    path.write_text("def build(num_classes):\n    return 42\n")
    with pytest.raises(BadInput, match="not an nn.Module"):
        create_model(f"{path}:build", 10)
