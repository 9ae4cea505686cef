"""Decision heads: from a block's input to one logit per output filter (mask = logit > 0).

A head variant is one class registered in :data:`HEADS`; ``--head NAME`` picks it, and the run
records, eval labels and the sparse engine all work from the class alone. A variant subclasses
:class:`DecisionHead` and overrides what differs, usually :meth:`logits`:

* :meth:`pool` — [N, C_in, H, W] → [N, C_in], one statistic per channel; it must map an all-zero
  channel to 0 (the engine never materialises masked channels and pools only the kept ones);
* :meth:`logits` — pooled [N, C_in] → [N, C_out], including the calibration ``logit_offset``;
* :meth:`affine` — for the engine's fast path: ``(softmax?, W, b)`` when the logits are
  ``W @ softmax?(pooled) + b`` at inference, else None (the engine then calls :meth:`logits`).

:class:`HeadSpec` carries the options every variant receives (pooling, softmax, input norm); a variant
may ignore those it has no use for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ftwt_cli.core.registry import Registry

HEAD_POOLS = ("max", "avg")
#: The paper's head (GMP → softmax → 1×1 conv); checkpoints without a variant name hold one.
DEFAULT_HEAD = "paper"

#: Head variants by name (``--head``).
HEADS: Registry[type["DecisionHead"]] = Registry("head variant")


@dataclass(frozen=True)
class HeadSpec:
    """Which head variant, and how it reads its block input; recorded in checkpoints and run directories.

    ``pool``: global ``max`` pooling (the paper's text) or ``avg`` (what the authors' public code does).
    ``softmax``: softmax over channels (the paper). ``norm``: standardise each pooled channel with batch
    statistics before the 1×1 conv (running statistics at inference, foldable into the conv, so free).
    The norm exists because the softmax of C pooled maps is ≈ 1/C per channel and varies across images
    by a few thousandths: without rescaling, SGD barely moves the head off its bias and the masks
    become a static per-channel vote (see docs/experiments, budget fidelity).
    """

    pool: str = "max"
    softmax: bool = True
    norm: bool = False
    variant: str = DEFAULT_HEAD

    def __post_init__(self) -> None:
        if self.pool not in HEAD_POOLS:
            raise ValueError(f"head pool must be one of {HEAD_POOLS}, got {self.pool!r}")
        HEADS[self.variant]  # raises UnknownName, listing the variants

    @classmethod
    def from_meta(cls, meta: dict) -> "HeadSpec":
        """Checkpoints written before these options existed hold only ``head_softmax``."""
        return cls(
            meta.get("head_pool", "max"), bool(meta.get("head_softmax", True)), bool(meta.get("head_norm", False)),
            meta.get("head", DEFAULT_HEAD),
        )  # fmt: skip

    def to_meta(self) -> dict:
        return {"head": self.variant, "head_pool": self.pool, "head_softmax": self.softmax, "head_norm": self.norm}

    @property
    def label(self) -> str:
        """Short description for tables: the parts that differ from the paper's head."""
        return HEADS[self.variant].describe(self)

    def build(self, in_channels: int, out_channels: int) -> "DecisionHead":
        return HEADS[self.variant](in_channels, out_channels, self)


@HEADS.register(DEFAULT_HEAD)
class DecisionHead(nn.Module):
    """f_p: global pool of the block input → softmax over channels (optional) → optional per-channel
    standardisation → 1×1 conv with bias → logits, plus a per-filter ``logit_offset`` (zero unless the
    model was calibrated to a FLOPs budget, see :mod:`ftwt_cli.algorithms.calibration`).

    The 1×1 conv acts on a 1×1 map, so it is stored as the equivalent ``nn.Linear``.
    """

    def __init__(self, in_channels: int, out_channels: int, spec: HeadSpec | None = None) -> None:
        super().__init__()
        spec = spec or HeadSpec()
        self.spec = spec
        self.pool_kind = spec.pool
        self.softmax = spec.softmax
        self.norm = nn.BatchNorm1d(in_channels, affine=False) if spec.norm else None
        self.proj = nn.Linear(in_channels, out_channels)
        self.register_buffer("logit_offset", torch.zeros(out_channels))

    @classmethod
    def describe(cls, spec: HeadSpec) -> str:
        """The label parts of ``spec`` that differ from the paper's head (empty for the paper's)."""
        parts = [] if spec.variant == DEFAULT_HEAD else [spec.variant]
        parts += [] if spec.pool == "max" else ["avg-pool"]
        parts += [] if spec.softmax else ["no-softmax"]
        parts += ["head-norm"] if spec.norm else []
        return " ".join(parts)

    def pool(self, block_input: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] → [N, C]: global max (or average) pooling; an all-zero channel pools to 0."""
        return block_input.amax(dim=(2, 3)) if self.pool_kind == "max" else block_input.mean(dim=(2, 3))

    def pooled(self, block_input: torch.Tensor) -> torch.Tensor:
        """The head's input vector [N, C_in]: pooled, softmaxed if configured (before the norm)."""
        pooled = self.pool(block_input)
        return pooled.softmax(dim=1) if self.softmax else pooled

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled block input [N, C_in] → logits [N, C_out] (offset included)."""
        x = pooled.softmax(dim=1) if self.softmax else pooled
        if self.norm is not None:
            x = self.norm(x)
        return self.proj(x) + self.logit_offset

    def forward(self, block_input: torch.Tensor) -> torch.Tensor:
        return self.logits(self.pool(block_input))

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the inference-time affine map after :meth:`pooled`: the norm's running
        statistics and the calibration offset folded into the 1×1 conv (what the sparse engine runs)."""
        weight, bias = self.proj.weight.detach(), self.proj.bias.detach()
        if self.norm is not None:
            scale = (self.norm.running_var + self.norm.eps).rsqrt()
            bias = bias - weight @ (self.norm.running_mean * scale)
            weight = weight * scale
        return weight.clone(), (bias + self.logit_offset).clone()

    def affine(self) -> tuple[bool, torch.Tensor, torch.Tensor] | None:
        """``(softmax?, W, b)`` with logits = W @ softmax?(pool(x)) + b at inference (the engine's fast
        path); a variant whose logits are not of that form returns None."""
        if type(self).logits is not DecisionHead.logits:  # a subclass changed the map: no closed form known
            return None
        return (self.softmax, *self.folded())

    @property
    def macs(self) -> int:
        return self.proj.in_features * self.proj.out_features
