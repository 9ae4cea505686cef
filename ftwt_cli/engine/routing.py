"""Which prototype each image runs: a block's decision head folded into one small scorer per input set.

The gated model picks ``argmax_k Σ_c logit_c · s_kc`` with ``s_k = 2 p_k − 1`` the prototype's signs
(:meth:`~ftwt_cli.core.codebook.Codebook.select`). When the head's logits are ``W · softmax?(pooled) + b``
(:meth:`~ftwt_cli.core.heads.DecisionHead.affine`, the paper's head), the scores are
``S · softmax?(pooled) + t`` with ``S = s W`` [K, C_in] and ``t = s b``: K dot products instead of C_out.

The block's input arrives compact (only the channels of its producer's prototype j). Masked channels
pool to 0, so for each input set j the scorer keeps the columns of S it has; under the softmax, the
missing channels still add exp(0) each to the denominator and their columns' sum to the numerator,
both folded once at build. The argmax (lowest index on ties) is the same choice as the gated model's,
up to float rounding of near-ties (counted as mask mismatches by the latency report).

A head variant without that closed form scores the scattered full-width pooled vector with its own
``logits`` and the codebook's rule.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ftwt_cli.core.codebook import Codebook
from ftwt_cli.core.heads import DecisionHead


def global_max(values: torch.Tensor) -> torch.Tensor:
    """[n, c, h, w] → [n, c], the max over pixels. On a channels-last tensor torch reduces narrow rows
    slowly: a small one (few channels, at most 32k values) is copied to the default format first, which
    is several times faster at 32×32 inputs; wide ones reduce as they are."""
    n, c, h, w = values.shape
    if c < 64 and c * h * w <= 32768 and not values.is_contiguous():
        values = values.contiguous()
    return values.amax(dim=(2, 3))


def pooling(head: DecisionHead):
    """The head's pooling as a function of [n, c, h, w] (the fast global max where it is the default's)."""
    if type(head).pool is not DecisionHead.pool:
        return head.pool
    return global_max if head.pool_kind == "max" else (lambda v: v.mean(dim=(2, 3)))


class Router:
    """Chooses a prototype per image for one routed conv, from its (compact or dense) input."""

    def __init__(self, head: DecisionHead, codebook: Codebook, in_sets: list[torch.Tensor | None], in_width: int) -> None:
        self.head = head.eval()
        self.codebook = codebook
        self.pool = pooling(head)
        self.pool_key = id(head) if type(head).pool is not DecisionHead.pool else head.pool_kind
        self.in_sets, self.in_width = in_sets, in_width
        form = head.affine()
        self.affine = form is not None
        if not self.affine:
            return
        softmax, weight, bias = form
        signs = 2.0 * codebook.prototypes.to(torch.float32) - 1.0
        scorer = signs @ weight.to(torch.float32)  # [K, C_in]
        self.offset = signs @ bias.to(torch.float32)  # [K]
        self.softmax = bool(softmax)
        self.columns, self.missing_sum, self.missing = [], [], []
        self.offset_np = self.offset.numpy()
        for in_set in in_sets:
            if in_set is None:
                self.columns.append(scorer.t().contiguous())
                self.missing_sum.append(torch.zeros_like(self.offset))
                self.missing.append(0)
            else:
                absent = torch.ones(in_width, dtype=torch.bool)
                absent[in_set] = False
                self.columns.append(scorer[:, in_set].t().contiguous())  # [n_j, K]
                self.missing_sum.append(scorer[:, absent].sum(dim=1))
                self.missing.append(int(absent.sum()))
        # One image at a time the same arithmetic runs in numpy: its calls cost a microsecond where
        # torch's cost several, and a head is a dozen calls (row vectors, no BLAS thread pool starts).
        self.columns_np = [c.numpy() for c in self.columns]
        self.missing_sum_np = [m.numpy() for m in self.missing_sum]

    def choose_one(self, pooled: torch.Tensor, j: int) -> int:
        """The prototype of one image (``pooled`` [1, n_j]), as :meth:`choose` picks it."""
        if not self.affine:
            return int(self._choose_generic(pooled, j))
        p = pooled.numpy()[0]
        if not self.softmax:
            return int((p @ self.columns_np[j] + self.offset_np).argmax())
        missing = self.missing[j]
        top = max(float(p.max()), 0.0) if missing else float(p.max())
        e = np.exp(p - top)
        numerator, denominator = e @ self.columns_np[j], float(e.sum())
        if missing:
            rest = math.exp(-top)
            numerator = numerator + rest * self.missing_sum_np[j]
            denominator += missing * rest
        return int((numerator / denominator + self.offset_np).argmax())

    def choose(self, pooled: torch.Tensor, j: int) -> torch.Tensor:
        """[n] long: the prototype of each image whose input (set ``j``) pooled to ``pooled`` [n, n_j]."""
        if not self.affine:
            return self._choose_generic(pooled, j)
        if not self.softmax:
            return (pooled @ self.columns[j] + self.offset).argmax(dim=1)
        missing = self.missing[j]
        top = pooled.amax(dim=1, keepdim=True)
        if missing:
            top = top.clamp_min(0.0)  # the missing channels pool to 0
        e = (pooled - top).exp_()
        numerator = e @ self.columns[j]
        denominator = e.sum(dim=1, keepdim=True)
        if missing:
            rest = (-top).exp_()
            numerator = numerator + rest * self.missing_sum[j]
            denominator = denominator + missing * rest
        return (numerator / denominator + self.offset).argmax(dim=1)

    def _choose_generic(self, pooled: torch.Tensor, j: int) -> torch.Tensor:
        in_set = self.in_sets[j]
        if in_set is not None:
            full = pooled.new_zeros(pooled.shape[0], self.in_width)
            full[:, in_set] = pooled
            pooled = full
        return self.codebook.select(self.head.logits(pooled))
