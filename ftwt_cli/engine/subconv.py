"""Sub-convolutions: one conv restricted to an output channel set and an input channel set, its fused
weights sliced and laid out once (a pre-sliced sub-network's layer), reused by every call that has them.

A regular conv keeps filters ``out`` × inputs ``in``. A depthwise conv computes the channels of ``out``
whose input is in ``in``; the others see only zero padding, so their map is the folded bias.

Kernels: ``F.conv2d`` (weights in the engine's memory format) or, in the default format, oneDNN's
pre-packed conv (``torch.ops.mkldnn_prepacked``: weights reordered once instead of on every call),
whichever :meth:`SubConv.prepare` times faster here. Both compute the same conv; they round differently.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ftwt_cli.engine.compact import put_channels, take_channels
from ftwt_cli.engine.geometry import ConvGeometry

_PREPACKED = getattr(torch.ops, "mkldnn_prepacked", None)
#: The pre-packed kernel is kept only when at least this much faster (closer timings are noise).
PACKED_MARGIN = 0.03


class EngineMemory:
    """The byte budget every step's pre-sliced sub-convs share (``--engine-memory-mb``)."""

    def __init__(self, budget_mb: float) -> None:
        self.budget = int(budget_mb * 2**20)
        self.used = 0

    def take(self, nbytes: int) -> bool:
        if self.used + nbytes > self.budget:
            return False
        self.used += nbytes
        return True

    def give(self, nbytes: int) -> None:
        self.used -= nbytes


def packing_available() -> bool:
    try:
        return _PREPACKED is not None and hasattr(_PREPACKED, "conv2d_prepack") and torch.backends.mkldnn.is_available()
    except (AttributeError, RuntimeError):  # an op namespace without the op
        return False


def _best_us(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter_ns()
        fn()
        best = min(best, (time.perf_counter_ns() - start) / 1e3)
    return best


class SubConv:
    """Conv ``g`` on output channels ``out_idx`` and input channels ``in_idx`` (sorted numpy int64)."""

    def __init__(self, g: ConvGeometry, out_idx: np.ndarray, in_idx: np.ndarray, share_full: bool = False) -> None:
        self.g = g
        self.out_idx, self.in_idx = out_idx, in_idx
        self.channels_last = False
        self.packed = None  # oneDNN context when that kernel was chosen
        self.kernel = "conv2d"
        self.timed = False
        tout = torch.from_numpy(out_idx)
        self.depthwise = g.depthwise
        if g.depthwise:
            computed = np.intersect1d(out_idx, in_idx, assume_unique=True)
            self.groups = computed.size
            tc = torch.from_numpy(computed)
            self.weight = g.weight.index_select(0, tc).contiguous()
            self.bias = g.bias.index_select(0, tc).contiguous()
            # Input positions of the computed channels (None: the input is exactly them, in order).
            self.in_pos = None if computed.size == in_idx.size else torch.from_numpy(np.searchsorted(in_idx, computed))
            # Output positions (None: every output channel is computed); the rest hold their bias.
            self.out_pos = None if computed.size == out_idx.size else torch.from_numpy(np.searchsorted(out_idx, computed))
            self.out_bias = g.bias.index_select(0, tout).view(1, -1, 1, 1)
        else:
            self.groups = 1
            self.in_pos = self.out_pos = None
            if share_full:  # the whole conv: the geometry's own weights, no copy
                self.weight, self.bias = g.weight, g.bias
            else:
                weight = g.weight.index_select(0, tout)
                if in_idx.size != g.in_per_group:
                    weight = weight.index_select(1, torch.from_numpy(in_idx))
                self.weight, self.bias = weight.contiguous(), g.bias.index_select(0, tout).contiguous()
        self._run_weight = self.weight
        self.shared = share_full

    @property
    def nbytes(self) -> int:
        """Bytes this sub-conv may hold beyond the geometry: its slices and one other layout of them
        (channels-last or pre-packed), so that preparing it for either format never exceeds what was
        reserved for it."""
        if self.shared:
            return 0
        return 2 * self.weight.numel() * self.weight.element_size() + self.bias.numel() * self.bias.element_size()

    @property
    def macs_per_channel(self) -> int:
        """MACs of one output channel for one image (a depthwise channel: its own kernel)."""
        g = self.g
        return self.weight[0].numel() * g.out_hw[0] * g.out_hw[1] if self.weight.shape[0] else 0

    def prepare(self, channels_last: bool, choose_kernel: bool = True, reps: int = 3) -> None:
        """Lay the weights out for the engine's memory format: a channels-last copy, or in the default
        format the pre-packed kernel where it was timed faster (timed once, with ``choose_kernel``, on
        first use of the default format; the decision is kept across format switches, the layouts are
        not: one other layout at a time)."""
        if channels_last == self.channels_last and (self.timed or not choose_kernel):
            return
        self.channels_last = channels_last
        self.packed = None
        if channels_last:
            self._run_weight = self.weight.contiguous(memory_format=torch.channels_last) if self.weight.dim() == 4 else self.weight
            return
        self._run_weight = self.weight
        if self.depthwise or not packing_available() or self.weight.shape[0] == 0:
            self.timed = self.timed or choose_kernel
            return
        if not self.timed and not choose_kernel:
            return
        packed = self._pack()
        if packed is not None and not self.timed:
            self.kernel = "packed" if self._packed_faster(packed, reps) else "conv2d"
        self.timed = True
        self.packed = packed if self.kernel == "packed" else None

    def _pack(self):
        g = self.g
        shape = [1, int(self.in_idx.size), *g.in_shape[2:]]
        try:
            return _PREPACKED.conv2d_prepack(self.weight, self.bias, list(g.stride), list(g.padding), list(g.dilation), 1, shape, "none")
        except RuntimeError:  # a shape oneDNN will not pack: the plain kernel
            return None

    def _packed_faster(self, packed, reps: int) -> bool:
        g = self.g
        x = torch.zeros([1, int(self.in_idx.size), *g.in_shape[2:]], dtype=self.weight.dtype)
        plain_us = packed_us = float("inf")
        for round_ in range(2):  # alternated, so that drifting load hits both
            for kind in ("plain", "packed") if round_ == 0 else ("packed", "plain"):
                if kind == "plain":
                    plain_us = min(plain_us, _best_us(lambda: g.conv(x, self.weight, self.bias), reps))
                else:
                    packed_us = min(packed_us, _best_us(lambda: _PREPACKED.conv2d_run(x, packed), reps))
        return packed_us < (1.0 - PACKED_MARGIN) * plain_us

    def run(self, values: torch.Tensor) -> torch.Tensor:
        """The sub-conv of ``values`` [n, |in|, H, W] (the input channels in ``in_idx`` order)."""
        g = self.g
        if not self.depthwise:
            if self.packed is not None:
                return _PREPACKED.conv2d_run(values, self.packed)
            return g.conv(values, self._run_weight, self.bias)
        n = values.shape[0]
        if self.groups:
            inputs = values if self.in_pos is None else take_channels(values, self.in_pos)
            y = g.conv(inputs, self._run_weight, self.bias, self.groups)
            if self.out_pos is None:
                return y
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        out = self.out_bias.expand(n, self.out_idx.size, *g.out_hw).contiguous(memory_format=fmt)
        return put_channels(out, self.out_pos, y) if self.groups else out
