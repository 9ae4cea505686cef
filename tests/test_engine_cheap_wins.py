"""The engine's exact cheap wins: residual adds in place where no later step reads an operand, shape
buckets only on oneDNN layers (zero filter rows, never padded inputs), heads pooling a shared input
once, and the channels-last format — each exact against the gated model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_engine import check_equivalent, noise_images, toy
from torch import nn

from ftwt_cli.engine import build_engine, heads, nodes
from ftwt_cli.engine.liveness import writable_operands


def test_residual_adds_write_only_into_operands_no_later_step_reads():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            y = self.a(x)
            z = y + x  # x is the caller's input, y is read again below: neither may be written
            w = torch.relu(self.b(z))
            return (w + z) + y  # w, z, and now y, are read by nobody later: all may be written

    net = Net().eval()
    engine = build_engine(net, (8, 8))
    order = [n for n in engine.graph_module.graph.nodes if n.op != "output"] + [n for n in engine.graph_module.graph.nodes if n.op == "output"]
    kinds = {n: nodes.kind(n, engine.modules_by_name) for n in order}
    flags = [v for n, v in writable_operands(order, engine.slot, kinds).items()]
    assert flags == [(False, False), (True, True), (True, True)]
    x = torch.randn(2, 3, 8, 8)
    before = x.clone()
    with torch.no_grad():
        assert torch.allclose(engine(x[:1]), net(x[:1]), atol=1e-5) and torch.allclose(engine(x), net(x), atol=1e-5)
    assert torch.equal(x, before)  # the caller's tensor is untouched


@pytest.mark.parametrize("size", [32, 224])
def test_sliced_filters_are_padded_to_buckets_only_on_onednn_layers(size):
    """Sliced weights get zero filter rows up to a shape bucket where the conv runs on oneDNN (which
    builds a kernel per shape), exact shapes where it runs im2col + GEMM; inputs are never padded."""
    model = toy("vgg", size)
    images = noise_images(size, 3)
    engine = check_equivalent(model, images, strategy="slice", cache_mb=64.0)
    padded = exact = 0
    for step in engine.steps:
        for key, (weight, _) in engine.cache.entries.items():
            if key[0] != step.key or len(key) != 3:
                continue
            ko, ki = int(np.frombuffer(key[1], bool).sum()), int(np.frombuffer(key[2], bool).sum())
            assert weight.shape[1] == ki
            if step._on_onednn(ki):
                assert weight.shape[0] % step.geometry.bucket_out == 0 or weight.shape[0] == step.geometry.out_channels
                padded += weight.shape[0] > ko
            else:
                assert weight.shape[0] == ko
                exact += 1
    assert exact > 0 and (padded > 0) == (size == 224), (padded, exact)


def test_heads_reading_the_same_input_pool_it_once(monkeypatch):
    """A downsampling block's first conv and its shortcut conv read the same tensor: one pooling."""
    model = toy("resnet", 32)
    engine = build_engine(model, layers="sparse", fallback=False)
    calls = []
    real = heads.global_max
    monkeypatch.setattr(heads, "global_max", lambda values: calls.append(values.shape) or real(values))
    with torch.no_grad():
        expected = model(noise_images(32, 1))
        got = engine(noise_images(32, 1))
    assert torch.allclose(got, expected, atol=1e-4)
    gated = [s for s in engine.steps if s.head is not None]
    assert len(calls) == len(gated) - 1  # the shortcut's head reused its block's pooled input


@pytest.mark.parametrize("name", ["resnet", "vgg", "depthwise"])
def test_channels_last_engine_is_exact_and_keeps_its_format(name):
    model = toy(name, 224)
    images = noise_images(224, 3)
    engine = check_equivalent(model, images, channels_last=True, prototype_images=images, layers="sparse", fallback=False)
    assert engine.channels_last
    formats = []
    for step in engine.steps:
        step.probe = lambda step, x, y: formats.append(y.values.is_contiguous(memory_format=torch.channels_last))
    with torch.no_grad():
        engine(images[:1])
    assert sum(formats) >= len(formats) - 1  # every conv output after the first stays channels-last
