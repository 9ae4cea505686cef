"""Decision heads at inference, on compact inputs: the block input's kept channels only.

Every head variant pools with its own :meth:`~ftwt_cli.core.heads.DecisionHead.pool` (a masked channel
pools to 0, so the engine pools the kept channels and leaves zeros elsewhere). Heads whose logits are an
affine map of (softmax of) the pooled vector (:meth:`~ftwt_cli.core.heads.DecisionHead.affine`: the
paper's head, with its input norm and calibration offset folded in) then run one matrix product; any
other variant runs its own :meth:`~ftwt_cli.core.heads.DecisionHead.logits`. The mask follows the
block's own rule, as :class:`~ftwt_cli.core.gating.GatedBlock` applies it: logit > 0, or the prototype
of its codebook that agrees best with the logits, or a predefined signature's top count.

The pooled input is computed once per compact input (heads of convs that read the same tensor share it),
and the matrix product runs in torch, on torch's threads: numpy's BLAS keeps a thread pool of its own
that competes with torch's for the same cores. Only heads too small for that pool to start
(:data:`SMALL_HEAD`) run in numpy, whose calls cost less than torch's at batch 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ftwt_cli.core.gating import GatedBlock
from ftwt_cli.core.heads import DecisionHead
from ftwt_cli.core.targets import top_count_mask
from ftwt_cli.engine.compact import Compact


def global_max(values: torch.Tensor) -> torch.Tensor:
    """[n, c, h, w] → [n, c]: the max over pixels. A channels-last tensor is reduced as its [pixels, c]
    view with k pixels per row, k·c a multiple of 16 (torch's max over rows of a matrix whose width is
    not is several times slower), then over the k; the result is the same."""
    n, c, h, w = values.shape
    if values.is_contiguous() or not values.is_contiguous(memory_format=torch.channels_last):
        return values.amax(dim=(2, 3))
    k = 16 // math.gcd(c, 16)
    while k > 1 and (h * w) % k:
        k //= 2
    rows = values.permute(0, 2, 3, 1).reshape(n, h * w // k, k * c)
    return rows.amax(dim=1).view(n, k, c).amax(dim=1)


#: Heads with at most this many weights (C_in · C_out) run in numpy at batch 1: OpenBLAS runs a
#: matrix-vector product that small on the calling thread (its threshold is 2304 · 4 elements).
SMALL_HEAD = 9216


class EngineHead:
    """One block's decision head, ready to decide on compact block inputs (one or several images)."""

    def __init__(self, head: DecisionHead, block: GatedBlock | None = None) -> None:
        self.head = head.eval()
        form = head.affine()
        self.fast = form is not None
        if self.fast:
            softmax, weight, bias = form
            self.softmax = bool(softmax)
            self.weight_t = weight.to(torch.float32).t().contiguous()  # [C_in, C_out]: pooled rows @ it
            self.bias = bias.to(torch.float32).clone()
            self.small = weight.numel() <= SMALL_HEAD
            self.np_weight, self.np_bias = self.weight_t.numpy(), self.bias.numpy()
        # Which pooling: the paper's two kinds share a cache entry with every head pooling the same way.
        overridden = type(head).pool is not DecisionHead.pool
        self.pool_key = (type(head), id(head)) if overridden else head.pool_kind
        codebook = None if block is None else block.codebook
        self.codebook = None if codebook is None else codebook.prototypes.detach().to(torch.float32).clone()
        self.keep_count = None if block is None else block.keep_count

    @property
    def prototypes(self) -> np.ndarray | None:
        """bool [K, C_out]: the codebook's prototype masks (None without a codebook)."""
        return None if self.codebook is None else self.codebook.numpy() > 0

    def pooled(self, x: Compact) -> torch.Tensor:
        """The pooled block input [n, C_in] (float32; zeros where channels are masked), once per input."""
        cache = x.pooled
        if cache is None:
            cache = x.pooled = {}
        found = cache.get(self.pool_key)
        if found is None:
            values = x.values
            if self.pool_key == "max":
                kept = global_max(values)
            elif self.pool_key == "avg":
                kept = values.mean(dim=(2, 3))
            else:
                kept = self.head.pool(values)
            kept = kept.to(torch.float32)
            if x.full:
                found = kept
            else:
                found = kept.new_zeros((kept.shape[0], x.width)).index_copy_(1, x.tidx, kept)
            cache[self.pool_key] = found
        return found

    def logits(self, x: Compact) -> torch.Tensor:
        """[n, C_out] logits of the block input ``x``."""
        pooled = self.pooled(x)
        with torch.no_grad():
            if not self.fast:
                return self.head.logits(pooled)
            if self.softmax:
                pooled = pooled.softmax(dim=1)
            return torch.addmm(self.bias, pooled, self.weight_t)

    def output_masks(self, x: Compact) -> np.ndarray:
        """bool [n, C_out]: the filters kept for each image of ``x``, by the block's own rule."""
        logits = self.logits(x)
        if self.codebook is not None:  # core.codebook: argmax of agreement, the lowest index on ties
            choice = (logits @ (2.0 * self.codebook - 1.0).T).argmax(dim=1)
            return (self.codebook[choice] > 0).numpy()
        if self.keep_count is not None:
            return top_count_mask(logits, self.keep_count).numpy()
        return (logits > 0).numpy()

    def pooled_one(self, x: Compact) -> np.ndarray:
        """:meth:`pooled` of a batch-1 input as a numpy vector [C_in] (scattered in numpy: cheaper)."""
        cache = x.pooled
        if cache is None:
            cache = x.pooled = {}
        key = ("numpy", self.pool_key)
        found = cache.get(key)
        if found is None:
            if x.full or self.pool_key in cache:
                found = self.pooled(x).numpy()[0]
            else:
                values = x.values
                kept = global_max(values) if self.pool_key == "max" else values.mean(dim=(2, 3)) if self.pool_key == "avg" else self.head.pool(values)
                found = np.zeros(x.width, dtype=np.float32)
                found[x.idx] = kept.to(torch.float32).numpy()[0]
            cache[key] = found
        return found

    def output_mask(self, x: Compact) -> np.ndarray:
        """bool [C_out] for a batch-1 input."""
        if self.fast and self.small and self.codebook is None and self.keep_count is None:
            pooled = self.pooled_one(x)
            if self.softmax:
                pooled = np.exp(pooled - pooled.max())
                pooled /= pooled.sum()
            return (pooled @ self.np_weight + self.np_bias) > 0
        return self.output_masks(x)[0]
