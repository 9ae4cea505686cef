"""Compact activations: only the channels that may be non-zero, plus their sorted channel indices.

Masked channels are exactly zero in the gated model, so the engine never materialises them. Channel
bookkeeping (masks, indices, cache keys) stays in numpy: one numpy call costs ~1 µs, one torch call
several, and a CIFAR ResNet56 runs ~55 blocks per image.

Values are [n, k, ...] (n images sharing one channel set: 1 at batch 1, a group in a batch) in either
memory format; the channel gathers and scatters below keep channels-last tensors channels-last and use
a [pixels, channels] view for them (a channel gather on a channels-last 4-D tensor is several times
slower than on that view).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Compact:
    """Activation [n, k, ...] holding only channels ``idx`` (sorted) of a ``width``-channel tensor.

    ``idx`` (int64) and ``mask`` (bool [width]) are numpy arrays; ``tidx`` is ``idx`` as a torch tensor
    (same memory). ``key`` (the mask's bytes, computed on first use) keys the weight caches. Channels of
    ``idx`` may hold zeros (a prototype's extra channels): ``mask`` is the layout, not a promise of
    non-zero values. ``pooled`` caches the heads' pooled inputs, so heads reading the same input pool once.
    """

    __slots__ = ("_key", "idx", "mask", "pooled", "tidx", "values", "width")

    def __init__(self, values: torch.Tensor, idx: np.ndarray, tidx: torch.Tensor, mask: np.ndarray, width: int, key: bytes | None = None):
        self.values = values
        self.idx = idx
        self.tidx = tidx
        self.mask = mask
        self.width = width
        self._key = key
        self.pooled: dict | None = None

    @property
    def key(self) -> bytes:
        if self._key is None:
            self._key = self.mask.tobytes()
        return self._key

    @property
    def full(self) -> bool:
        return self.values.shape[1] == self.width

    def with_values(self, values: torch.Tensor) -> Compact:
        """The same channels holding new values (a channel-wise op's result)."""
        return Compact(values, self.idx, self.tidx, self.mask, self.width, self._key)

    def dense(self) -> torch.Tensor:
        if self.values.shape[1] == self.width:
            return self.values
        out = zeros_like_format(self.values, (self.values.shape[0], self.width, *self.values.shape[2:]))
        return put_channels(out, self.tidx, self.values)

    @staticmethod
    def of(x: torch.Tensor) -> Compact:
        idx, tidx, mask, key = all_channels(x.shape[1])
        return Compact(x, idx, tidx, mask, x.shape[1], key)

    @staticmethod
    def from_mask(values: torch.Tensor, mask: np.ndarray, idx: np.ndarray | None = None) -> Compact:
        if idx is None:
            idx = np.flatnonzero(mask)
        return Compact(values, idx, torch.from_numpy(idx), mask, mask.size)


@functools.cache
def all_channels(width: int) -> tuple[np.ndarray, torch.Tensor, np.ndarray, bytes]:
    """(idx, tidx, mask, key) of a full-width activation; shared, never written to."""
    idx = np.arange(width, dtype=np.int64)
    mask = np.ones(width, dtype=bool)
    return idx, torch.from_numpy(idx), mask, mask.tobytes()


def as_compact(value) -> Compact:
    return value if value.__class__ is Compact else Compact.of(value)


def as_dense(value):
    return value.dense() if value.__class__ is Compact else value


# -- channel gathers and scatters in either memory format ------------------------------------------


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.shape[1] > 1 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _pixels(t: torch.Tensor) -> torch.Tensor:
    """A channels-last [n, c, h, w] tensor as its [n·h·w, c] view (no copy)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _from_pixels(flat: torch.Tensor, like: torch.Tensor, channels: int) -> torch.Tensor:
    n, _, h, w = like.shape
    return flat.view(n, h, w, channels).permute(0, 3, 1, 2)


def zeros_like_format(like: torch.Tensor, shape) -> torch.Tensor:
    """Zeros of ``shape`` in ``like``'s memory format."""
    fmt = torch.channels_last if _channels_last(like) and len(shape) == 4 else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, memory_format=fmt).zero_()


def take_channels(values: torch.Tensor, tidx: torch.Tensor) -> torch.Tensor:
    """values[:, tidx] as a new tensor of the same memory format."""
    if _channels_last(values):
        return _from_pixels(_pixels(values).index_select(1, tidx), values, tidx.numel())
    return values.index_select(1, tidx)


def put_channels(out: torch.Tensor, tidx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """out[:, tidx] = values, in place; returns ``out``."""
    if _channels_last(out) and _channels_last(values):
        _pixels(out).index_copy_(1, tidx, _pixels(values))
        return out
    return out.index_copy_(1, tidx, values)


def add_channels(out: torch.Tensor, tidx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """out[:, tidx] += values, in place; returns ``out``."""
    if _channels_last(out) and _channels_last(values):
        _pixels(out).index_add_(1, tidx, _pixels(values))
        return out
    return out.index_add_(1, tidx, values)


# -- residual adds, flatten, linear -----------------------------------------------------------------


def _positions(outer: Compact, inner: Compact) -> torch.Tensor | None:
    """Where ``inner``'s channels sit in ``outer`` (None unless ``inner``'s set is inside ``outer``'s)."""
    if inner.idx.size > outer.idx.size or (inner.mask & ~outer.mask).any():
        return None
    return torch.from_numpy(np.searchsorted(outer.idx, inner.idx))


def add(a: Compact, b: Compact, writable: tuple[bool, bool] = (False, False)) -> Compact:
    """Residual add by index: the result holds the union of both channel sets.

    ``writable`` says which operand's values the engine may overwrite (no later step reads them: see
    :func:`~ftwt_cli.engine.program.writable_operands`); the sum then lands in that tensor instead of a
    new one (a clone of the residual stream per block otherwise).
    """
    if a.values.shape[1] == b.values.shape[1] and (a.idx is b.idx or np.array_equal(a.idx, b.idx)):
        if writable[0]:
            return a.with_values(a.values.add_(b.values))
        if writable[1]:
            return b.with_values(b.values.add_(a.values))
        return a.with_values(a.values + b.values)
    for outer, inner, may_write in ((a, b, writable[0]), (b, a, writable[1])):
        at = _positions(outer, inner)
        if at is not None:  # one channel set holds the other (e.g. a dense residual stream): one indexed add
            target = outer.values if may_write else outer.values.clone()
            return outer.with_values(add_channels(target, at, inner.values))
    mask = a.mask | b.mask
    position = np.cumsum(mask) - 1  # where each channel lands in the union
    out = zeros_like_format(a.values, (a.values.shape[0], int(position[-1]) + 1, *a.values.shape[2:]))
    put_channels(out, torch.from_numpy(position[a.idx]), a.values)
    add_channels(out, torch.from_numpy(position[b.idx]), b.values)
    return Compact.from_mask(out, mask)


def flatten(value):
    """Flatten a [n, C, 1, 1] map to [n, C] keeping the compact form; other shapes go dense."""
    c = as_compact(value)
    if c.values.dim() == 4 and c.values.shape[2:] == (1, 1):
        return c.with_values(c.values.flatten(1))
    return torch.flatten(c.dense(), 1)


def linear(module: nn.Linear, x: Compact) -> Compact:
    """A linear layer reading only the active input features."""
    if x.values.dim() != 2 or x.full:
        return Compact.of(module(x.dense()))
    return Compact.of(F.linear(x.values, module.weight.index_select(1, x.tidx), module.bias))
