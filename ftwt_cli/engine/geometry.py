"""Conv geometry: what one BN-folded conv *is* (fused weights laid out for slicing, shapes, strides),
apart from what a call does with it (:mod:`~ftwt_cli.engine.conv` keeps the mutable per-call state).

The one BN fold of the engine lives here (:func:`fold`); dense references and the sparse steps both use it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

#: Sliced conv shapes per channel dimension (0: exact shapes, no padding); see ConvGeometry.
SHAPE_BUCKETS = 8


def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of ``bn(conv(x))`` as one conv, eval-mode statistics (bias zeros without a BN or bias)."""
    if bn is not None:
        weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    else:
        weight = conv.weight
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, dtype=conv.weight.dtype)
    return weight.detach(), bias.detach()


def folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> nn.Conv2d:
    """A copy of ``conv`` computing ``bn(conv(x))`` (see :func:`fold`)."""
    fused = copy.deepcopy(conv)
    weight, bias = fold(conv, bn)
    fused.weight = nn.Parameter(weight.clone(), requires_grad=False)
    fused.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return fused


class ConvGeometry:
    """A BN-folded conv's weights and shapes, laid out for slicing; never changes after the build.

    Weights are stored out-major: a slice is one gather of kh·kw runs. Where a sliced conv runs on
    oneDNN, its filter count is rounded up to one of SHAPE_BUCKETS sizes (zero filters pad it): oneDNN
    builds a kernel per new shape, which costs about as much as the conv itself, and per-sample masks
    would otherwise make nearly every shape new.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, in_shape, out_hw, key: int, name: str = "") -> None:
        if conv.padding_mode != "zeros":
            raise NotImplementedError("sparse conv supports zero padding only")
        weight, bias = fold(conv, bn)
        self.kernel = weight[0, 0].numel()
        self.weight = weight.clone(memory_format=torch.contiguous_format)
        self.rows = self.weight.view(-1, self.kernel)  # [out · in, kh · kw]
        self.filters = self.weight.view(self.weight.shape[0], -1)  # [out, in · kh · kw]
        self.bias = bias.contiguous()
        self.out_channels, self.in_per_group = self.weight.shape[:2]
        self.bucket_out = max(8, self.out_channels // SHAPE_BUCKETS) if SHAPE_BUCKETS else 1
        self.groups = conv.groups
        self.depthwise = conv.groups == conv.in_channels == conv.out_channels
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.in_shape = tuple(in_shape)
        self.out_hw = tuple(out_hw)
        self.key = key  # this conv's place in the program (weight-cache keys start with it)
        self.name = name

    @property
    def macs(self) -> int:
        """Dense MACs of this conv for one image."""
        return self.weight.numel() * self.out_hw[0] * self.out_hw[1]

    @property
    def regular(self) -> bool:
        """An ordinary (ungrouped) conv: the one kind with slice / rows / core paths."""
        return self.groups == 1

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int = 1) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)
