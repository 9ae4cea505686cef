"""Compact activations: only the channels that may be non-zero, plus their sorted channel indices.

Masked channels are exactly zero in the gated model, so the engine never materialises them. Channel
bookkeeping (masks, indices, cache keys) stays in numpy: one numpy call costs ~1 µs, one torch call
several, and a CIFAR ResNet56 runs ~55 blocks per image.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Compact:
    """Activation [1, k, ...] holding only channels ``idx`` (sorted) of a ``width``-channel tensor.

    ``idx`` (int64) and ``mask`` (bool [width]) are numpy arrays; ``tidx`` is ``idx`` as a torch tensor
    (same memory). ``key`` (the mask's bytes, computed on first use) keys the weight cache.
    """

    __slots__ = ("values", "idx", "tidx", "mask", "width", "_key")

    def __init__(self, values: torch.Tensor, idx: np.ndarray, tidx: torch.Tensor, mask: np.ndarray, width: int, key: bytes | None = None):
        self.values = values
        self.idx = idx
        self.tidx = tidx
        self.mask = mask
        self.width = width
        self._key = key

    @property
    def key(self) -> bytes:
        if self._key is None:
            self._key = self.mask.tobytes()
        return self._key

    @property
    def full(self) -> bool:
        return self.values.shape[1] == self.width

    def with_values(self, values: torch.Tensor) -> "Compact":
        """The same channels holding new values (a channel-wise op's result)."""
        return Compact(values, self.idx, self.tidx, self.mask, self.width, self._key)

    def dense(self) -> torch.Tensor:
        if self.values.shape[1] == self.width:
            return self.values
        out = self.values.new_zeros((1, self.width, *self.values.shape[2:]))
        return out.index_copy_(1, self.tidx, self.values)

    @staticmethod
    def of(x: torch.Tensor) -> "Compact":
        idx, tidx, mask, key = all_channels(x.shape[1])
        return Compact(x, idx, tidx, mask, x.shape[1], key)

    @staticmethod
    def from_mask(values: torch.Tensor, mask: np.ndarray, idx: np.ndarray | None = None) -> "Compact":
        if idx is None:
            idx = np.flatnonzero(mask)
        return Compact(values, idx, torch.from_numpy(idx), mask, mask.size)


@functools.lru_cache(maxsize=None)
def all_channels(width: int) -> tuple[np.ndarray, torch.Tensor, np.ndarray, bytes]:
    """(idx, tidx, mask, key) of a full-width activation; shared, never written to."""
    idx = np.arange(width, dtype=np.int64)
    mask = np.ones(width, dtype=bool)
    return idx, torch.from_numpy(idx), mask, mask.tobytes()


def as_compact(value) -> Compact:
    return value if value.__class__ is Compact else Compact.of(value)


def as_dense(value):
    return value.dense() if value.__class__ is Compact else value


def add(a: Compact, b: Compact) -> Compact:
    """Residual add by index: the result holds the union of both channel sets."""
    if a.values.shape[1] == b.values.shape[1] and (a.idx is b.idx or np.array_equal(a.idx, b.idx)):
        return a.with_values(a.values + b.values)
    if b.values.shape[1] == b.width:
        a, b = b, a
    if a.values.shape[1] == a.width:  # e.g. a dense residual stream: one indexed add
        return a.with_values(a.values.index_add(1, b.tidx, b.values))
    mask = a.mask | b.mask
    position = np.cumsum(mask) - 1  # where each channel lands in the union
    out = a.values.new_zeros((1, int(position[-1]) + 1, *a.values.shape[2:]))
    out.index_copy_(1, torch.from_numpy(position[a.idx]), a.values)
    out.index_add_(1, torch.from_numpy(position[b.idx]), b.values)
    return Compact.from_mask(out, mask)


def flatten(value):
    """Flatten a [1, C, 1, 1] map to [1, C] keeping the compact form; other shapes go dense."""
    c = as_compact(value)
    if c.values.dim() == 4 and c.values.shape[2:] == (1, 1):
        return c.with_values(c.values.flatten(1))
    return torch.flatten(c.dense(), 1)


def linear(module: nn.Linear, x: Compact) -> Compact:
    """A linear layer reading only the active input features."""
    if x.values.dim() != 2 or x.full:
        return Compact.of(module(x.dense()))
    return Compact.of(F.linear(x.values, module.weight.index_select(1, x.tidx), module.bias))
