"""The one BN fold of the engine: a conv and its eval-mode BN as one conv (dense references and the
routing engine's sub-convs both use it)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights


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
