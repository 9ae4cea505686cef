"""Routing among K sub-networks per layer: a block's mask is one of K prototype masks (a codebook).

Each image uses the prototype its head selects: the one whose keep/drop pattern agrees best with the
head's logits, ``argmax_k Σ_c logit_c · (2 p_kc − 1)`` (ties: the lower index). K = 1 is static pruning
with that prototype's widths; K → ∞ is unconstrained FTWT. The prototypes are buffers of the gated
block, so checkpoints carry them (``meta["codebook_sizes"]`` says K per block before the weights load),
and they are exactly the channel sets the sparse engine can pre-slice.
"""

from __future__ import annotations

import torch
from torch import nn


class Codebook(nn.Module):
    """K prototype masks [K, C] of one block, and the rule that picks one per image."""

    def __init__(self, prototypes: torch.Tensor) -> None:
        super().__init__()
        if prototypes.dim() != 2 or prototypes.shape[0] < 1:
            raise ValueError(f"prototypes must be a [K >= 1, C] mask, got shape {tuple(prototypes.shape)}")
        self.register_buffer("prototypes", (prototypes > 0).to(torch.float32))

    @property
    def size(self) -> int:
        return self.prototypes.shape[0]

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, K]: how well each prototype agrees with each image's logits."""
        signs = 2.0 * self.prototypes.to(logits.dtype) - 1.0
        return logits @ signs.T

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """[N] long: the prototype of each image (argmax of :meth:`scores`, the lowest index on ties)."""
        return self.scores(logits.detach()).argmax(dim=1)

    def mask(self, logits: torch.Tensor, straight_through: bool = False) -> torch.Tensor:
        """[N, C] 0/1 masks: each image's prototype; with ``straight_through`` the backward pass sees the
        sigmoid of the logits (as :func:`~ftwt_cli.core.gating.binarize`)."""
        hard = self.prototypes.to(logits.dtype)[self.select(logits)]
        if not straight_through:
            return hard
        soft = torch.sigmoid(logits)
        return hard + (soft - soft.detach())
