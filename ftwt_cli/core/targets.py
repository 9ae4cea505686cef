"""Self-supervised targets: which filters of a block matter for one sample (Algorithm 1 and its variants).

Vocabulary
----------
response    a_c = max over H,W of |O_c|, the per-sample, per-channel activation peak, shape [N, C].
threshold   the smallest r at which Algorithm 1 keeps a channel (0: always kept, inf: never kept).
            ``mask(r) = threshold <= r + EPS``; every r can be evaluated from one set of thresholds,
            which is what makes ``ftwt estimate`` a single data pass for any number of ratios.

Target rules are registered in :data:`TARGETS` (``--gt`` lists them): a rule is one class built from
one number (the mass ratio r, a kept fraction, ...) whose ``mask(response)`` returns bool [N, C].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ftwt_cli.core.registry import Registry

#: Tolerance of the cumulative-mass comparison (Algorithm 1 prunes where cumsum > r + EPS).
EPS = 1e-6


def check_ratio(r: float) -> float:
    """Return ``r`` if it is a valid mass ratio in (0, 1], else raise ValueError."""
    r = float(r)
    if not (0.0 < r <= 1.0) or math.isnan(r):
        raise ValueError(f"r must be in (0, 1], got {r}")
    return r


def channel_response(activations: torch.Tensor) -> torch.Tensor:
    """a_c = GMP(|O_c|): [N, C, H, W] → [N, C]. Never carries gradient."""
    return activations.detach().abs().amax(dim=(2, 3))


def keep_thresholds(response: torch.Tensor) -> torch.Tensor:
    """Algorithm 1, inverted: the smallest r at which each channel is kept, [N, C] float32.

    Channels are sorted by response (descending; ties by channel index, so results are deterministic),
    the normalised cumulative sum at a channel's position is its threshold. The strongest channel of a
    sample with any non-zero response gets 0 (always kept); channels whose response is 0 get +inf
    (pruned even at r = 1), so an all-zero sample keeps nothing and no NaN can arise.
    """
    # Sort in the response's own dtype (the order is the same), accumulate in float64.
    sorted_a, order = response.detach().sort(dim=1, descending=True, stable=True)
    sorted_a = sorted_a.to(torch.float64)
    total = sorted_a.sum(dim=1, keepdim=True)
    cum = sorted_a.cumsum(dim=1) / total.clamp_min(torch.finfo(torch.float64).tiny)
    cum[:, 0] = 0.0
    cum = cum.masked_fill(sorted_a <= 0, math.inf)
    return torch.empty_like(cum).scatter_(1, order, cum).to(torch.float32)


def rowwise_by_width(fn: Callable[[torch.Tensor], torch.Tensor], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Apply a row-independent ``fn`` ([M, C] → [M, ...]) to every tensor, one call per distinct width.

    Blocks of equal width are stacked along the rows first: a ResNet56 step then makes 3 calls instead
    of 55, which matters because these per-block tensors are small and per-call overhead dominates.
    """
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.shape[1], []).append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
    for members in groups.values():
        joined = fn(torch.cat([tensors[i] for i in members]))
        for i, part in zip(members, joined.split([tensors[i].shape[0] for i in members])):
            out[i] = part
    return out


class Target(Protocol):
    """A self-supervised target rule: per-sample channel responses [N, C] → keep mask bool [N, C]."""

    name: str

    def mask(self, response: torch.Tensor) -> torch.Tensor: ...


#: Target rules by name, each built from one number: ``TARGETS["mass"](0.9)``.
TARGETS: Registry[Callable[[float], Target]] = Registry("target kind")


@TARGETS.register("mass")
@dataclass(frozen=True)
class CumulativeMassTarget:
    """Keep the strongest channels until they hold a fraction ``r`` of the activation mass (the paper)."""

    r: float
    name: str = "mass"
    help = "cumulative mass r (the paper)"

    def __post_init__(self) -> None:
        check_ratio(self.r)

    def mask(self, response: torch.Tensor) -> torch.Tensor:
        return keep_thresholds(response) <= self.r + EPS


@TARGETS.register("topk")
@dataclass(frozen=True)
class TopKTarget:
    """Keep a fixed fraction of channels in every layer and sample, highest response first."""

    fraction: float
    name: str = "topk"
    help = "a fixed kept fraction per layer (--r)"

    def __post_init__(self) -> None:
        check_ratio(self.fraction)

    def mask(self, response: torch.Tensor) -> torch.Tensor:
        channels = response.shape[1]
        k = max(1, math.ceil(self.fraction * channels - EPS))
        return top_count_mask(response, k)


@dataclass(frozen=True)
class FixedCountTarget:
    """Keep exactly ``count`` channels per sample, highest response first (a predefined signature's layer)."""

    count: int
    name: str = "count"

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"count must be at least 1, got {self.count}")

    def mask(self, response: torch.Tensor) -> torch.Tensor:
        return top_count_mask(response, self.count)


def top_count_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """bool [N, C]: the ``count`` highest scores of every row (ties by channel index)."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter_(1, order[:, : min(count, scores.shape[1])], True)


def make_target(kind: str, value: float) -> Target:
    """Target rule by registered name (``mass``: value = r; ``topk``: value = kept fraction)."""
    return TARGETS[kind](value)


def ground_truth_mask(activations: torch.Tensor, r: float) -> torch.Tensor:
    """Algorithm 1: activations [N, C, H, W] → bool [N, C], True = keep."""
    return CumulativeMassTarget(r).mask(channel_response(activations))


def topk_mask(activations: torch.Tensor, fraction: float) -> torch.Tensor:
    """The fixed-fraction ("uniform") target: keep the ceil(fraction·C) channels of highest GMP."""
    return TopKTarget(fraction).mask(channel_response(activations))
