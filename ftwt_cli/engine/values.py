"""What flows between the routing engine's steps: dense tensors, or a routed block's compact outputs.

A routed conv computes, for each image, only the filters of the prototype its head selected. Its
output is a :class:`Routed` value: groups of images that chose the same prototype, each group's
values holding just that prototype's channels ([g, n_k, H, W]). At batch 1 there is one group and no
image index. Channel-wise ops run on the groups as they are; a residual add writes them into the
dense stream at their channels (in place when liveness allows); anything else sees them scattered
back to full width, the zeros where the masked filters were.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Group:
    """Images ``images`` (None: every image of the batch, in order) that run prototype ``k``."""

    images: torch.Tensor | None
    k: int
    values: torch.Tensor  # [g, n_k, H, W], the prototype's channels in ascending order


@dataclass
class Routed:
    """A routed block's output for a batch of ``batch`` images; ``channels[k]`` are prototype k's channels."""

    groups: list[Group]
    channels: list[torch.Tensor]
    width: int  # the block's full channel count
    batch: int

    def map(self, op: Callable[[torch.Tensor], torch.Tensor]) -> "Routed":
        """A zero-preserving channel-wise op applied to every group (the masked channels stay zero)."""
        return Routed([Group(g.images, g.k, op(g.values)) for g in self.groups], self.channels, self.width, self.batch)


def add_into(stream: torch.Tensor, routed: Routed) -> torch.Tensor:
    """``stream`` [B, C, H, W] += ``routed`` at its channels, in place; returns ``stream``."""
    for g in routed.groups:
        channels = routed.channels[g.k]
        if g.images is None:
            stream.index_add_(1, channels, g.values)
        else:
            stream.index_put_((g.images[:, None], channels[None, :]), g.values, accumulate=True)
    return stream


def dense(value):
    """A full-width tensor for ``value`` (a dense tensor is returned as it is)."""
    if not isinstance(value, Routed):
        return value
    first = value.groups[0].values
    shape = (value.batch, value.width, *first.shape[2:])
    fmt = torch.channels_last if first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous() else torch.contiguous_format
    return add_into(torch.zeros(shape, dtype=first.dtype).contiguous(memory_format=fmt), value)


def add(a, b, writable: tuple[bool, bool]):
    """``a + b`` for dense or routed operands; written into a dense operand that no later step reads."""
    if isinstance(a, Routed) and not isinstance(b, Routed):
        a, b, writable = b, a, (writable[1], writable[0])
    if not isinstance(a, Routed):
        if isinstance(b, Routed):
            return add_into(a if writable[0] else a.clone(), b)
        if a.shape == b.shape and a.dtype == b.dtype:  # in place only where no broadcast widens the sum
            if writable[0]:
                return a.add_(b)
            if writable[1]:
                return b.add_(a)
        return a + b
    return add_into(dense(a), b)  # two routed blocks (a residual block's last conv and its downsample)


def masks_of(routed_choices: list[Group], prototypes: torch.Tensor, batch: int) -> torch.Tensor:
    """bool [batch, C]: each image's prototype mask from the groups a step routed."""
    out = torch.zeros(batch, prototypes.shape[1], dtype=torch.bool)
    for g in routed_choices:
        if g.images is None:
            out[:] = prototypes[g.k]
        else:
            out[g.images] = prototypes[g.k]
    return out
