"""Re-estimating BatchNorm statistics under the masks a model ships with.

Calibrating the heads (or re-sizing a codebook) after training changes which channels are zero, but the
running statistics of every BN downstream were accumulated under the masks before. One no-grad pass
over training images in train mode with a cumulative average (``momentum=None``) replaces them with
the statistics of the final masks. The heads' own input norms keep theirs: their thresholds were
calibrated with them.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ftwt_cli.console import progress_bar
from ftwt_cli.core.gating import FTWTModel


def backbone_batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm of the backbone (decision heads' norms excluded)."""
    heads = {id(m) for h in model.heads() for m in h.modules()} if isinstance(model, FTWTModel) else set()
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in heads]


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, images: Iterable, device: torch.device, show: Callable = progress_bar) -> int:
    """Recompute the backbone's BN running statistics from ``images`` (batches, or (images, labels)
    pairs) as the model runs now (masks applied); returns the number of images. Leaves it in eval mode."""
    norms = backbone_batchnorms(model)
    saved = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the whole pass
        m.train()
    seen = 0
    try:
        total = len(images) if hasattr(images, "__len__") else None
        with show("BN statistics", total) as advance:
            for batch in images:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x.to(device, non_blocking=True))
                seen += x.shape[0]
                advance()
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
        model.eval()
    return seen
