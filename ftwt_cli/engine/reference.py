"""Dense references: the same model run as plain BN-folded convs, with or without its heads' masks.

The whole-engine fallback (never slower than dense) runs :class:`DenseModel` with the heads applying
their masks, so its outputs are the gated model's; latency is measured against the plain dense backbone
(``masked=False``). Both fold every block's BN into its conv with :func:`~ftwt_cli.engine.geometry.fold`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ftwt_cli.core.batchnorm import split_batchnorm
from ftwt_cli.core.gating import FTWTModel, GatedBlock, replace_submodule
from ftwt_cli.core.graph import analyze
from ftwt_cli.core.targets import top_count_mask
from ftwt_cli.engine.geometry import folded_conv


class _MaskedConv(nn.Module):
    """A BN-folded conv whose (unchanged) decision head zeroes the filters it drops, by its block's rule:
    logit > 0 (binarize), its codebook's prototype, or a predefined signature's top count."""

    def __init__(self, conv: nn.Conv2d, head: nn.Module, block: GatedBlock) -> None:
        super().__init__()
        self.conv, self.head = conv, head
        self.codebook, self.keep_count = block.codebook, block.keep_count
        self.mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(x)
        if self.codebook is not None:
            self.mask = self.codebook.mask(logits) > 0
        elif self.keep_count is not None:
            self.mask = top_count_mask(logits, self.keep_count)
        else:
            self.mask = logits > 0
        return self.conv(x).mul_(self.mask[:, :, None, None].to(x.dtype))


def folded_backbone(model: nn.Module, input_size: tuple[int, int], masked: bool = False) -> tuple[nn.Module, list[_MaskedConv]]:
    """A copy of the backbone with every block's BN folded into its conv; with ``masked`` (FTWT models)
    each folded conv keeps its decision head and applies its mask. Returns the backbone and the masked
    convs in block order (none unless ``masked``)."""
    gates: list[_MaskedConv] = []
    if isinstance(model, FTWTModel):
        backbone = copy.deepcopy(model.backbone).eval()
        for spec in model.graph.blocks:
            gated = backbone.get_submodule(spec.conv)
            fused = folded_conv(gated.conv, gated.bn)
            if masked:
                fused = _MaskedConv(fused, gated.head, gated)
                gates.append(fused)
            replace_submodule(backbone, spec.conv, fused)
        return backbone, gates
    backbone = copy.deepcopy(model).eval()
    for spec in analyze(backbone, input_size).blocks:
        bn, tail = split_batchnorm(backbone.get_submodule(spec.bn))  # a fused BN keeps its activation (tail)
        replace_submodule(backbone, spec.conv, folded_conv(backbone.get_submodule(spec.conv), bn))
        replace_submodule(backbone, spec.bn, tail)
    return backbone, gates


def folded_dense(model: nn.Module, input_size: tuple[int, int]) -> nn.Module:
    """The plain backbone (no heads, no masks) with every block's BN folded into its conv: the fair dense reference."""
    return folded_backbone(model, input_size)[0]


class DenseModel(nn.Module):
    """The whole-engine fallback: BN-folded dense convs (for an FTWT model, masked by its own heads),
    optionally in channels-last memory format. ``masked=False`` drops an FTWT model's heads: the plain
    dense backbone, the reference latencies are measured against."""

    def __init__(self, model: nn.Module, input_size: tuple[int, int], channels_last: bool = False, masked: bool = True) -> None:
        super().__init__()
        backbone, self.gates = folded_backbone(model, input_size, masked=masked and isinstance(model, FTWTModel))
        self.channels_last = channels_last
        self.backbone = backbone.to(memory_format=torch.channels_last) if channels_last else backbone

    def last_masks(self) -> list[torch.Tensor]:
        """Kept masks [N, C] of the last batch, in block order."""
        return [g.mask for g in self.gates]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)


def dense_fallback(model: nn.Module, input_size: tuple[int, int], channels_last: bool = False, masked: bool = True) -> DenseModel:
    return DenseModel(model, input_size, channels_last, masked).eval()
