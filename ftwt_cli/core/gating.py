"""The gating wrapper: a decision head at every conv→BN block, binary masks on the block outputs.

Everything that trains, estimates, evaluates or runs an FTWT model goes through :class:`FTWTModel`,
with :mod:`~ftwt_cli.core.graph` finding the blocks, :mod:`~ftwt_cli.core.targets` the ground truth,
:mod:`~ftwt_cli.core.heads` the decision heads and :mod:`~ftwt_cli.core.flops` the MAC accounting.

Vocabulary
----------
block       a conv→BN[→activation] chain found in the backbone; it gets one decision head.
mask source how a block decides its mask (:data:`MASK_SOURCES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ftwt_cli.core.batchnorm import split_batchnorm
from ftwt_cli.core.codebook import Codebook
from ftwt_cli.core.graph import UnsupportedModel, analyze
from ftwt_cli.core.heads import DecisionHead, HeadSpec
from ftwt_cli.core.targets import Target, channel_response, top_count_mask


def binarize_top_count(logits: torch.Tensor, count: int, straight_through: bool = False) -> torch.Tensor:
    """Keep exactly the ``count`` highest logits per sample (a predefined signature); see :func:`binarize`."""
    hard = top_count_mask(logits.detach(), count).to(logits.dtype)
    if not straight_through:
        return hard
    soft = torch.sigmoid(logits)
    return hard + (soft - soft.detach())


def binarize(logits: torch.Tensor, straight_through: bool = False) -> torch.Tensor:
    """Mask = sigmoid(logits) > 0.5 as floats; with ``straight_through`` the backward pass sees sigmoid."""
    hard = (logits > 0).to(logits.dtype)
    if not straight_through:
        return hard
    soft = torch.sigmoid(logits)
    # soft - soft.detach() is exactly 0, so the forward value is exactly 0/1 ((hard + soft) - soft is not).
    return hard + (soft - soft.detach())


@dataclass
class BlockRecord:
    """What one gated block saw in the last forward pass (only kept while recording)."""

    logits: torch.Tensor | None  # head logits [N, C_out]
    response: torch.Tensor  # unmasked channel responses [N, C_out], the source of the targets
    mask: torch.Tensor | None  # the mask applied to the output [N, C_out] (None: nothing applied)


#: How a gated block decides its mask. ``dense``: none (the plain backbone); ``predicted``: the head's
#: binary mask (training and inference); ``target``: the ground truth itself (cascaded estimates);
#: ``observed``: the heads predict and their masks are recorded, but nothing is applied (head warm-up).
MASK_SOURCES = ("dense", "predicted", "target", "observed")


class GatedBlock(nn.Module):
    """A conv→BN[→act] block with its decision head. It replaces the conv; the BN becomes Identity (a
    fused BN+activation module leaves its activation in place, see :func:`graph.split_batchnorm`).

    The activation stays where it was in the backbone: masking the BN output is the same as masking
    the activation output because only activations with f(0) = 0 are attached (see graph.py).
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d,
        head: DecisionHead,
        activation: Callable[[torch.Tensor], torch.Tensor] | None,
        monotone_activation: bool,
    ) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.head = head
        # A plain attribute, not a submodule: the backbone still owns the activation module.
        self.__dict__["activation"] = activation
        self.monotone_activation = monotone_activation
        self.mask_source = "dense"
        self.target: Target | None = None
        self.keep_count: int | None = None  # predefined signature: the head keeps exactly this many channels
        self.codebook: Codebook | None = None  # routing among K prototype masks (see core.codebook)
        self.detach_head_input = True  # decoupled training: the head loss never reaches the backbone
        self.straight_through = False  # joint training: gradients cross the binarisation
        self.record = False
        self.last: BlockRecord | None = None

    def extra_repr(self) -> str:
        return f"mask_source={self.mask_source}"

    def response(self, bn_output: torch.Tensor) -> torch.Tensor:
        """GMP(|O|) of the block output O = act(BN(conv(x))), before any mask."""
        with torch.no_grad():
            if self.activation is None:
                return channel_response(bn_output)
            if self.monotone_activation:
                # act(max(y)) == max(act(y)) for non-decreasing, non-negative act (ReLU, ReLU6):
                # pool first, activate the [N, C] result; saves a full-size pass.
                return self.activation(bn_output.detach().amax(dim=(2, 3)))
            return channel_response(self.activation(bn_output.detach()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        source = self.mask_source
        logits = None
        if source in ("predicted", "observed"):
            logits = self.head(x.detach() if self.detach_head_input else x)
        y = self.bn(self.conv(x))
        response = self.response(y) if (self.record or source == "target") else None
        if source == "dense":
            mask = None
        elif source == "target":
            assert self.target is not None, "mask_source='target' needs a target rule"
            mask = self.target.mask(response).to(y.dtype)
        else:
            straight_through = self.straight_through and self.training
            if self.codebook is not None:
                mask = self.codebook.mask(logits, straight_through)
            elif self.keep_count is None:
                mask = binarize(logits, straight_through)
            else:
                mask = binarize_top_count(logits, self.keep_count, straight_through)
        if self.record:
            self.last = BlockRecord(logits=logits, response=response, mask=mask)
        return y if mask is None or source == "observed" else y * mask[:, :, None, None]


class FTWTModel(nn.Module):
    """A backbone with a decision head at every conv→BN block found by :func:`graph.analyze`.

    ``forward`` returns the backbone's logits; :meth:`records` returns what every block saw.
    """

    def __init__(self, backbone: nn.Module, input_size: tuple[int, int], head: HeadSpec = HeadSpec(), gate: str = "all"):
        super().__init__()
        self.gate = gate  # which blocks are gated (core.graph.GATES)
        self.graph = analyze(backbone, input_size, gate=gate)
        if not self.graph.blocks:
            raise UnsupportedModel(
                f"{type(backbone).__name__} has no conv→BN block to gate (FTWT gates convolutions whose only "
                "user is a BatchNorm2d; this model has none)"
            )
        self.head_spec = head
        blocks: list[GatedBlock] = []
        for spec in self.graph.blocks:
            conv = backbone.get_submodule(spec.conv)
            bn, tail = split_batchnorm(backbone.get_submodule(spec.bn))  # type: ignore[misc]  # analyze checked it
            head = self.head_spec.build(conv.in_channels, conv.out_channels)
            head.to(device=conv.weight.device, dtype=conv.weight.dtype)
            block = GatedBlock(conv, bn, head, spec.activation, spec.monotone_activation)
            replace_submodule(backbone, spec.conv, block)
            replace_submodule(backbone, spec.bn, tail)
            blocks.append(block)
        self.backbone = backbone
        self.__dict__["blocks"] = blocks  # graph order; not registered twice in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def configure(
        self,
        *,
        mask_source: str | None = None,
        record: bool | None = None,
        target: Target | Sequence[Target] | None = None,
        decoupled: bool | None = None,
        keep_counts: Sequence[int | None] | None = None,
    ) -> "FTWTModel":
        """Set how every block masks and records. ``target`` is one rule for all blocks or one per block."""
        if mask_source is not None and mask_source not in MASK_SOURCES:
            raise ValueError(f"mask_source must be one of {MASK_SOURCES}, got {mask_source!r}")
        targets = per_block(target, len(self.blocks)) if target is not None else [None] * len(self.blocks)
        if keep_counts is not None:  # a predefined signature: heads keep exactly this many channels (None: threshold)
            if len(keep_counts) != len(self.blocks):
                raise ValueError(f"expected {len(self.blocks)} keep counts, got {len(keep_counts)}")
            for block, count in zip(self.blocks, keep_counts):
                block.keep_count = count
        for block, target in zip(self.blocks, targets):
            if mask_source is not None:
                block.mask_source = mask_source
            if record is not None:
                block.record = record
                if not record:
                    block.last = None
            if target is not None:
                block.target = target
            if decoupled is not None:
                block.detach_head_input = decoupled
                block.straight_through = not decoupled
        return self

    def set_codebooks(self, prototypes: Sequence[torch.Tensor | None]) -> "FTWTModel":
        """Give each block its prototype masks [K, C] (None: the head's own threshold decides)."""
        if len(prototypes) != len(self.blocks):
            raise ValueError(f"expected {len(self.blocks)} codebooks, got {len(prototypes)}")
        for block, protos in zip(self.blocks, prototypes):
            if protos is not None and protos.shape[1] != block.conv.out_channels:
                raise ValueError(f"a codebook of {block.conv.out_channels}-filter block has {protos.shape[1]} columns")
            device = block.conv.weight.device
            block.codebook = None if protos is None else Codebook(protos).to(device)
        return self

    def codebook_sizes(self) -> list[int]:
        """K per block (0: no codebook), what a checkpoint records to rebuild the buffers before loading."""
        return [0 if b.codebook is None else b.codebook.size for b in self.blocks]

    def records(self) -> list[BlockRecord]:
        missing = [i for i, b in enumerate(self.blocks) if b.last is None]
        if missing:
            raise RuntimeError("no block records: call configure(record=True) before the forward pass")
        return [b.last for b in self.blocks]  # type: ignore[misc]

    def targets(self) -> list[Target]:
        """Each block's target rule (set by :meth:`configure`)."""
        if any(b.target is None for b in self.blocks):
            raise RuntimeError("no target rule: call configure(target=...) first")
        return [b.target for b in self.blocks]  # type: ignore[misc]

    def heads(self) -> list[DecisionHead]:
        return [b.head for b in self.blocks]

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for h in self.heads() for p in h.parameters()]

    def backbone_parameters(self) -> list[nn.Parameter]:
        head_ids = {id(p) for p in self.head_parameters()}
        return [p for p in self.parameters() if id(p) not in head_ids]


def per_block(target: Target | Sequence[Target], blocks: int) -> list[Target]:
    """One target rule per block from a shared rule or a per-block list."""
    if isinstance(target, Sequence):
        if len(target) != blocks:
            raise ValueError(f"expected {blocks} per-block targets, got {len(target)}")
        return list(target)
    return [target] * blocks


def truth_masks(records: list[BlockRecord], target: Target | Sequence[Target]) -> list[torch.Tensor]:
    """The ground-truth keep mask [N, C] of every block, from its unmasked response."""
    return [t.mask(rec.response) for rec, t in zip(records, per_block(target, len(records)))]


def head_loss(records: list[BlockRecord], truth: list[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of (Σ over filters of BCEWithLogits(P, g), averaged over the batch);
    ``truth`` holds each block's ground-truth mask (:func:`truth_masks`)."""
    losses = []
    for rec, goal in zip(records, truth):
        assert rec.logits is not None, "head loss needs logits: record in training mode"
        per_sample = F.binary_cross_entropy_with_logits(rec.logits, goal.to(rec.logits.dtype), reduction="none").sum(dim=1)
        losses.append(per_sample.mean())
    return torch.stack(losses).mean()


def replace_submodule(root: nn.Module, qualified_name: str, new: nn.Module) -> None:
    parent_name, _, child = qualified_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
