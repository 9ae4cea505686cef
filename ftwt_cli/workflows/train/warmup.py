"""Head-only phases before training starts, on the frozen backbone.

* ``--head-init ones``: :func:`warm_up_heads` trains every head towards keeping every channel;
* ``--head-warmup E``: :func:`warm_up_on_targets` trains the heads towards their targets for E epochs
  with no mask applied, so the backbone never fine-tunes under an untrained head's masks.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from ftwt_cli.core.gating import FTWTModel, head_loss, truth_masks
from ftwt_cli.core.targets import Target

#: --head-init ones: head-only steps until every logit of a batch exceeds the margin (sigmoid 0.73).
WARMUP_MARGIN = 1.0
WARMUP_MAX_STEPS = 200


def warm_up_heads(model: FTWTModel, loader: Iterable, device: torch.device, lr: float, momentum: float) -> int:
    """``--head-init ones``: head-only SGD towards the keep-everything target, with the backbone frozen
    (eval mode, detached head inputs), until every head keeps every channel of a batch with a margin
    (logit > WARMUP_MARGIN); at most WARMUP_MAX_STEPS steps. Returns the number of steps taken."""
    decoupled = model.blocks[0].detach_head_input
    model.eval().configure(decoupled=True)
    optimizer = torch.optim.SGD(model.head_parameters(), lr=lr, momentum=momentum)
    batches = (batch for _ in itertools.count() for batch in loader)  # cycles through epochs
    for steps, (images, _) in enumerate(batches):
        model(images.to(device, non_blocking=True))
        logits = [rec.logits for rec in model.records()]
        if steps == WARMUP_MAX_STEPS or all(bool((lg > WARMUP_MARGIN).all()) for lg in logits):
            break
        # Summed over heads: each head is trained on its own loss, whatever the number of blocks.
        loss = sum(F.binary_cross_entropy_with_logits(lg, torch.ones_like(lg), reduction="none").sum(1).mean() for lg in logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.configure(decoupled=decoupled)
    for p in model.parameters():
        p.grad = None
    return steps


def warm_up_on_targets(
    model: FTWTModel, loader: Iterable, device: torch.device, target: Target, epochs: int, lr: float, momentum: float,
    show: Callable,
) -> None:
    """--head-warmup: train the heads towards their targets on the frozen backbone (eval mode, no mask
    applied) before training starts, so the backbone never fine-tunes under an untrained head's masks."""
    optimizer = torch.optim.SGD(model.head_parameters(), lr=lr, momentum=momentum)
    model.eval().configure(mask_source="observed")
    for head in model.heads():
        head.train()  # a head's own norm learns its statistics
    for epoch in range(epochs):
        with show(f"head warm-up {epoch + 1}/{epochs}", len(loader)) as advance:
            for images, _ in loader:
                model(images.to(device, non_blocking=True))
                records = model.records()
                loss = head_loss(records, truth_masks(records, target))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                advance(info=f"head loss {loss.item():.3f}")
    model.configure(mask_source="predicted")
    for p in model.parameters():
        p.grad = None
