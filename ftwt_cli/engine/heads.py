"""Decision heads at inference, on compact inputs: the block input's kept channels only.

Every head variant pools with its own :meth:`~ftwt_cli.core.heads.DecisionHead.pool` (a masked channel
pools to 0, so the engine pools the kept channels and leaves zeros elsewhere). Heads whose logits are an
affine map of (softmax of) the pooled vector (:meth:`~ftwt_cli.core.heads.DecisionHead.affine`: the
paper's head, with its input norm and calibration offset folded in) then run one numpy matvec; any other
variant runs its own :meth:`~ftwt_cli.core.heads.DecisionHead.logits`. Either way the mask is the gated
model's: logit > 0.
"""

from __future__ import annotations

import numpy as np
import torch

from ftwt_cli.core.heads import DecisionHead
from ftwt_cli.engine.compact import Compact


class EngineHead:
    """One block's decision head, ready to decide on compact block inputs."""

    def __init__(self, head: DecisionHead) -> None:
        self.head = head.eval()
        form = head.affine()
        self.fast = form is not None
        if self.fast:
            softmax, weight, bias = form
            self.softmax = bool(softmax)
            self.weight = weight.to(torch.float32).numpy().copy()
            self.bias = bias.to(torch.float32).numpy().copy()

    def pooled(self, x: Compact) -> np.ndarray:
        """The pooled block input [C_in] (float32; zeros where channels are masked)."""
        pooled = np.zeros(x.width, dtype=np.float32)
        if x.idx.size:
            pooled[x.idx] = self.head.pool(x.values).numpy()[0]
        return pooled

    def output_mask(self, x: Compact) -> np.ndarray:
        """bool [C_out]: the filters the head keeps for this input (binarize's rule, logit > 0)."""
        pooled = self.pooled(x)
        if not self.fast:
            with torch.no_grad():
                return (self.head.logits(torch.from_numpy(pooled)[None]) > 0).numpy()[0]
        if self.softmax:
            pooled = np.exp(pooled - pooled.max())
            pooled /= pooled.sum()
        return (np.dot(self.weight, pooled) + self.bias) > 0
