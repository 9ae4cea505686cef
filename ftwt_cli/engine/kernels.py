"""Pre-sliced, pre-packed convolutions: one conv restricted to an input channel set and an output channel
set, its BN-folded weights sliced once at build and, where oneDNN is there, reordered once into its
blocked layout with the block's activation fused (``torch.ops.mkldnn._convolution_pointwise``).

Eager ``F.conv2d`` reorders the weights on every call and, below a size, falls back to im2col; a
pre-packed conv does neither, which is most of the difference between eager dense and the routing
engine at batch 1. Where the private oneDNN ops are missing (a build without mkldnn) or ``pack=False``,
the same slices run through ``F.conv2d`` in the default memory format, with the activation after it.

A depthwise conv computes the output channels whose input channel is present; the others see only
zero padding, so their map is the (activated) bias, filled in without a conv.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

_MKLDNN = getattr(torch.ops, "mkldnn", None)


def packing_available() -> bool:
    """Whether this torch build has oneDNN's pre-packed conv ops."""
    try:
        return (
            torch.backends.mkldnn.is_available()
            and hasattr(_MKLDNN, "_reorder_convolution_weight")
            and hasattr(_MKLDNN, "_convolution_pointwise")
        )
    except (AttributeError, RuntimeError):  # an op namespace without the op
        return False


#: oneDNN's pre-packed convs pay off when a model's convs average at least this many MACs per image;
#: below it (ResNet56 at 32×32, MobileNetV2's depthwise convs) the per-call cost dominates and eager
#: ``F.conv2d`` in the default format ran faster here (docs/experiments/2026-12-04-routing-engine.md).
PACKED_MIN_MACS = 10e6


def packing_pays(convs) -> bool:
    """Whether pre-packing is the faster kernel for ``convs`` (``nn.Conv2d`` with their output sizes)."""
    macs = [conv.weight.numel() * h * w for conv, (h, w) in convs]
    return packing_available() and bool(macs) and sum(macs) / len(macs) >= PACKED_MIN_MACS


@dataclass(frozen=True)
class Activation:
    """An activation fused into the conv: oneDNN's name and scalars, and the same as a torch function."""

    attr: str
    scalars: tuple[float, ...]
    fn: Callable[[torch.Tensor], torch.Tensor]


RELU = Activation("relu", (), torch.relu_)
RELU6 = Activation("hardtanh", (0.0, 6.0), lambda y: y.clamp_(0.0, 6.0))


@dataclass(frozen=True)
class Shape:
    """What a conv is besides its weights."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    kernel: tuple[int, int]
    groups: int
    depthwise: bool
    in_hw: tuple[int, int]


class SubConv:
    """``weight`` [O, I, kh, kw] and ``bias`` [O] of a BN-folded conv sliced to ``out_idx`` × ``in_idx``
    (index tensors into its full channels; the input arrives holding just ``in_idx``, in that order;
    None: every input channel). A grouped conv that is not depthwise takes its whole input and computes
    every filter; the output channels are then selected (exact, not faster)."""

    #: Sub-convs built since import: each is built once, at engine build time (tests count them).
    builds = 0

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, out_idx: torch.Tensor, in_idx: torch.Tensor | None,
                 shape: Shape, activation: Activation | None, pack: bool) -> None:  # fmt: skip
        SubConv.builds += 1
        self.shape, self.activation = shape, activation
        self.out_channels = int(out_idx.numel())
        self.in_pos = self.out_pos = self.constant = self.select = None
        if in_idx is None:
            in_idx = torch.arange(weight.shape[1] * shape.groups)
        if shape.depthwise:
            # Output channel c reads input channel c: compute those present on both sides.
            present = torch.zeros(weight.shape[0], dtype=torch.bool)
            present[in_idx] = True
            computed = out_idx[present[out_idx]]
            self.groups = int(computed.numel())
            if self.groups != in_idx.numel():
                self.in_pos = torch.searchsorted(in_idx, computed)
            if self.groups != self.out_channels:
                self.out_pos = torch.searchsorted(out_idx, computed)
                constant = bias[out_idx].clone()
                self.constant = (activation.fn(constant) if activation else constant).view(1, -1, 1, 1)
            weight, bias = weight[computed], bias[computed]
        elif shape.groups == 1:
            self.groups = 1
            weight = weight[out_idx][:, in_idx]
            bias = bias[out_idx]
        else:
            self.groups = shape.groups
            if self.out_channels != weight.shape[0]:
                self.select = out_idx
        self.bias = bias.contiguous()
        self.nbytes = weight.numel() * weight.element_size() + self.bias.numel() * self.bias.element_size()
        self.channels_last = pack and packing_available()  # the engine's activation format
        self.packed = self.channels_last and self.groups > 0
        if self.packed:
            in_channels = weight.shape[1] * self.groups
            self.weight = _MKLDNN._reorder_convolution_weight(
                weight.contiguous(), list(shape.padding), list(shape.stride), list(shape.dilation), self.groups,
                [1, in_channels, *shape.in_hw],
            )  # fmt: skip
            self.attr = activation.attr if activation else "none"
            self.scalars = list(activation.scalars) if activation else []
        else:  # F.conv2d in the default format: what eager PyTorch runs fastest on small convs
            self.weight = weight.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The sub-conv of ``x`` [n, |in_idx|, H, W] → [n, |out_idx|, H', W']."""
        s = self.shape
        if self.in_pos is not None:
            x = x.index_select(1, self.in_pos)
        if self.groups == 0:
            y = None
        elif self.packed:
            y = _MKLDNN._convolution_pointwise(
                x, self.weight, self.bias, list(s.padding), list(s.stride), list(s.dilation), self.groups, self.attr, self.scalars, ""
            )  # fmt: skip
        else:
            y = F.conv2d(x, self.weight, self.bias, s.stride, s.padding, s.dilation, self.groups)
            if self.activation is not None:
                y = self.activation.fn(y)
        if self.select is not None:
            y = y.index_select(1, self.select)
        if self.constant is None:
            return y
        h, w = _out_hw(s, x.shape[2:])
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        out = self.constant.expand(x.shape[0], self.out_channels, h, w).contiguous(memory_format=fmt)
        return out if y is None else out.index_copy_(1, self.out_pos, y)


def _out_hw(s: Shape, in_hw) -> tuple[int, int]:
    return tuple((n + 2 * p - d * (k - 1) - 1) // st + 1 for n, k, p, d, st in zip(in_hw, s.kernel, s.padding, s.dilation, s.stride))  # type: ignore[return-value]
