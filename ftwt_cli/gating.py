"""The FTWT core: self-supervised targets, decision heads and the gating wrapper.

Everything that trains, estimates, evaluates or runs an FTWT model goes through this module and its
sibling :mod:`ftwt_cli.graph` (block discovery) and :mod:`ftwt_cli.flops` (MAC accounting).

Vocabulary
----------
block       a conv→BN[→activation] chain found in the backbone; it gets one decision head.
response    a_c = max over H,W of |O_c|, the per-sample, per-channel activation peak, shape [N, C].
threshold   the smallest r at which Algorithm 1 keeps a channel (0: always kept, inf: never kept).
            ``mask(r) = threshold <= r + EPS``; every r can be evaluated from one set of thresholds,
            which is what makes ``ftwt estimate`` a single data pass for any number of ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

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


def ground_truth_mask(activations: torch.Tensor, r: float) -> torch.Tensor:
    """Algorithm 1: activations [N, C, H, W] → bool [N, C], True = keep."""
    return CumulativeMassTarget(r).mask(channel_response(activations))


def topk_mask(activations: torch.Tensor, fraction: float) -> torch.Tensor:
    """The fixed-fraction ("uniform") target: keep the ceil(fraction·C) channels of highest GMP."""
    return TopKTarget(fraction).mask(channel_response(activations))


class Target(Protocol):
    """A self-supervised target rule: per-sample channel responses [N, C] → keep mask bool [N, C]."""

    name: str

    def mask(self, response: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class CumulativeMassTarget:
    """Keep the strongest channels until they hold a fraction ``r`` of the activation mass (the paper)."""

    r: float
    name: str = "mass"

    def __post_init__(self) -> None:
        check_ratio(self.r)

    def mask(self, response: torch.Tensor) -> torch.Tensor:
        return keep_thresholds(response) <= self.r + EPS


@dataclass(frozen=True)
class TopKTarget:
    """Keep a fixed fraction of channels in every layer and sample, highest response first."""

    fraction: float
    name: str = "topk"

    def __post_init__(self) -> None:
        check_ratio(self.fraction)

    def mask(self, response: torch.Tensor) -> torch.Tensor:
        channels = response.shape[1]
        k = max(1, math.ceil(self.fraction * channels - EPS))
        order = response.argsort(dim=1, descending=True, stable=True)
        keep = torch.zeros_like(response, dtype=torch.bool)
        return keep.scatter_(1, order[:, :k], True)


def make_target(kind: str, value: float) -> Target:
    """Target rule by name: ``mass`` (Algorithm 1, value = r) or ``topk`` (value = kept fraction)."""
    if kind == "mass":
        return CumulativeMassTarget(value)
    if kind == "topk":
        return TopKTarget(value)
    raise ValueError(f"unknown target kind {kind!r} (expected 'mass' or 'topk')")


HEAD_POOLS = ("max", "avg")


@dataclass(frozen=True)
class HeadSpec:
    """How a decision head reads its block input; recorded in checkpoints and run directories.

    ``pool``: global ``max`` pooling (the paper's text) or ``avg`` (what the authors' public code does).
    ``softmax``: softmax over channels (the paper). ``norm``: standardise each pooled channel with batch
    statistics before the 1×1 conv (running statistics at inference, foldable into the conv, so free).
    The norm exists because the softmax of C pooled maps is ≈ 1/C per channel and varies across images
    by a few thousandths: without rescaling, SGD barely moves the head off its bias and the masks
    become a static per-channel vote (see README, "Budget fidelity").
    """

    pool: str = "max"
    softmax: bool = True
    norm: bool = False

    def __post_init__(self) -> None:
        if self.pool not in HEAD_POOLS:
            raise ValueError(f"head pool must be one of {HEAD_POOLS}, got {self.pool!r}")

    @classmethod
    def from_meta(cls, meta: dict) -> "HeadSpec":
        """Checkpoints written before these options existed hold only ``head_softmax``."""
        return cls(meta.get("head_pool", "max"), bool(meta.get("head_softmax", True)), bool(meta.get("head_norm", False)))

    def to_meta(self) -> dict:
        return {"head_pool": self.pool, "head_softmax": self.softmax, "head_norm": self.norm}

    @property
    def label(self) -> str:
        """Short description for tables: the parts that differ from the paper's head."""
        parts = [] if self.pool == "max" else ["avg-pool"]
        parts += [] if self.softmax else ["no-softmax"]
        parts += ["head-norm"] if self.norm else []
        return " ".join(parts)


class DecisionHead(nn.Module):
    """f_p: global pool of the block input → softmax over channels (optional) → optional per-channel
    standardisation → 1×1 conv with bias → logits, plus a per-filter ``logit_offset`` (zero unless the
    model was calibrated to a FLOPs budget, see :mod:`ftwt_cli.calibrate`).

    The 1×1 conv acts on a 1×1 map, so it is stored as the equivalent ``nn.Linear``.
    """

    def __init__(self, in_channels: int, out_channels: int, spec: HeadSpec = HeadSpec()) -> None:
        super().__init__()
        self.pool = spec.pool
        self.softmax = spec.softmax
        self.norm = nn.BatchNorm1d(in_channels, affine=False) if spec.norm else None
        self.proj = nn.Linear(in_channels, out_channels)
        self.register_buffer("logit_offset", torch.zeros(out_channels))

    def pooled(self, block_input: torch.Tensor) -> torch.Tensor:
        """The head's input vector [N, C_in]: pooled, softmaxed if configured (before the norm)."""
        pooled = block_input.amax(dim=(2, 3)) if self.pool == "max" else block_input.mean(dim=(2, 3))
        return pooled.softmax(dim=1) if self.softmax else pooled

    def forward(self, block_input: torch.Tensor) -> torch.Tensor:
        x = self.pooled(block_input)
        if self.norm is not None:
            x = self.norm(x)
        return self.proj(x) + self.logit_offset

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the inference-time affine map after :meth:`pooled`: the norm's running
        statistics and the calibration offset folded into the 1×1 conv (what the sparse engine runs)."""
        weight, bias = self.proj.weight.detach(), self.proj.bias.detach()
        if self.norm is not None:
            scale = (self.norm.running_var + self.norm.eps).rsqrt()
            bias = bias - weight @ (self.norm.running_mean * scale)
            weight = weight * scale
        return weight.clone(), (bias + self.logit_offset).clone()

    @property
    def macs(self) -> int:
        return self.proj.in_features * self.proj.out_features


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
    """A conv→BN[→act] block with its decision head. It replaces the conv; the BN becomes Identity.

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
            mask = binarize(logits, self.straight_through and self.training)
        if self.record:
            self.last = BlockRecord(logits=logits, response=response, mask=mask)
        return y if mask is None or source == "observed" else y * mask[:, :, None, None]


class FTWTModel(nn.Module):
    """A backbone with a decision head at every conv→BN block found by :func:`graph.analyze`.

    ``forward`` returns the backbone's logits; :meth:`records` returns what every block saw.
    """

    def __init__(self, backbone: nn.Module, input_size: tuple[int, int], head: HeadSpec = HeadSpec()):
        super().__init__()
        from ftwt_cli.graph import analyze

        self.graph = analyze(backbone, input_size)
        self.head_spec = head
        blocks: list[GatedBlock] = []
        for spec in self.graph.blocks:
            conv = backbone.get_submodule(spec.conv)
            bn = backbone.get_submodule(spec.bn)
            head = DecisionHead(conv.in_channels, conv.out_channels, self.head_spec)
            head.to(device=conv.weight.device, dtype=conv.weight.dtype)
            block = GatedBlock(conv, bn, head, spec.activation, spec.monotone_activation)
            replace_submodule(backbone, spec.conv, block)
            replace_submodule(backbone, spec.bn, nn.Identity())
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
    ) -> "FTWTModel":
        """Set how every block masks and records. ``target`` is one rule for all blocks or one per block."""
        if mask_source is not None and mask_source not in MASK_SOURCES:
            raise ValueError(f"mask_source must be one of {MASK_SOURCES}, got {mask_source!r}")
        targets = per_block(target, len(self.blocks)) if target is not None else [None] * len(self.blocks)
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
