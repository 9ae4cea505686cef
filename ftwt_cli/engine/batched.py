"""Batched inference: the images of a batch grouped, per layer, by the channel set they run with.

A batch travels as :class:`Grouped`: parts of (image indices, :class:`~ftwt_cli.engine.compact.Compact`
holding those images), each part's images sharing one channel set. At a gated conv every image's head
gives its mask; a part runs as one batched call on the cheapest prototype covering all its masks, or
splits by each image's own cheapest prototype where that saves more than the calls it adds
(:func:`grouping`); each image's extra channels are zeroed (the gated model's ``y · mask``). Images no
prototype covers, and layers that run dense, take the full conv on their part with each image's mask
applied. Residual adds regroup two operands to the parts they have in common. Outputs equal the gated
model's, image by image.
"""

from __future__ import annotations

import numpy as np
import torch

from ftwt_cli.engine.compact import Compact, add, flatten, linear, take_channels
from ftwt_cli.engine.conv import ConvStep


class Grouped:
    """A batch of ``size`` images as parts ``[(rows, Compact)]``: ``rows`` (int64 numpy) are the images'
    places in the batch, the compact values [len(rows), k, ...] their activations."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: list[tuple[np.ndarray, Compact]], size: int) -> None:
        self.parts = parts
        self.size = size

    @staticmethod
    def of(x: torch.Tensor) -> Grouped:
        return Grouped([(np.arange(x.shape[0]), Compact.of(x))], x.shape[0])

    def map(self, fn) -> Grouped:
        return Grouped([(rows, fn(c)) for rows, c in self.parts], self.size)


def as_grouped(value, size: int) -> Grouped:
    if value.__class__ is Grouped:
        return value
    c = value if value.__class__ is Compact else Compact.of(value)
    return Grouped([(np.arange(size), c)], size)


def assemble(value):
    """The batch as one dense tensor in image order (anything that is not :class:`Grouped` as it is)."""
    if value.__class__ is not Grouped:
        return value.dense() if value.__class__ is Compact else value
    if len(value.parts) == 1:
        rows, c = value.parts[0]
        if np.array_equal(rows, np.arange(value.size)):
            return c.dense()
    first = value.parts[0][1].dense()
    out = first.new_empty((value.size, *first.shape[1:])).contiguous(memory_format=_format(first))
    for rows, c in value.parts:
        out.index_copy_(0, torch.from_numpy(rows), c.dense())
    return out


def _format(t: torch.Tensor):
    return torch.channels_last if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def _images(c: Compact, positions: np.ndarray) -> Compact:
    """The images at ``positions`` of a part (the part itself when that is all of them, in order)."""
    if positions.size == c.values.shape[0] and np.array_equal(positions, np.arange(positions.size)):
        return c
    values = c.values.index_select(0, torch.from_numpy(positions))
    return Compact(values, c.idx, c.tidx, c.mask, c.width, c._key)


# -- steps -------------------------------------------------------------------------------------------


def conv(step: ConvStep, value: Grouped) -> Grouped:
    """A conv step on a batch: per part, heads on every image, then one conv per covering prototype."""
    g = step.geometry
    out: list[tuple[np.ndarray, Compact]] = []
    step.last_masks = None if step.head is None else np.zeros((value.size, g.out_channels), dtype=bool)
    for rows, x in value.parts:
        masks = None if step.head is None else step.head.output_masks(x)
        if masks is None:  # no head: every image keeps every filter, one call serves the part
            out.append((rows, step.compute(x, None)))
            continue
        step.last_masks[rows] = masks
        if step.prototypes is None or not step.sparse or not (g.regular or g.depthwise):
            out.append((rows, _masked_dense(step, x, masks)))
            continue
        cover = grouping(step, x, masks)
        for k in np.unique(cover):
            chosen = np.flatnonzero(cover == k)
            part = _images(x, chosen)
            y = step.covered(part, masks[chosen], int(k)) if k >= 0 else None
            if k == -1:
                step.counts["uncovered"] += chosen.size
            out.append((rows[chosen], y if y is not None else _masked_dense(step, part, masks[chosen])))
    if step.last_masks is not None:
        step.last_mask = step.last_masks[-1]
    return Grouped(out, value.size)


def grouping(step: ConvStep, x: Compact, masks: np.ndarray) -> np.ndarray:
    """Per image of a part, the prototype it runs (-1: uncovered, -2: every filter kept; both take the
    full conv). One call on the cheapest prototype covering every image's mask, unless splitting the
    part by each image's own cheapest cover saves more than the calls it adds (a conv call has a fixed
    cost, :data:`CALL_COST_MACS`; a split part also costs the copies of its groups and regroups at the
    next residual add, charged as one more call)."""
    table = step.prototypes
    union = masks.any(axis=0)
    together = -2 if union.all() else table.cover_one(union)
    if len(masks) == 1:
        return np.array([together if together != -1 else -1])
    width = table.width
    sizes = np.append(table.sizes, [width, width])  # index -1, -2: the full conv
    g = step.geometry
    per_channel = g.weight[0, 0].numel() * g.out_hw[0] * g.out_hw[1] * (1 if g.depthwise else x.idx.size)
    call = CALL_COST_MACS / max(per_channel, 1)  # a call's fixed cost, in output channels of this conv
    one = float(sizes[together]) * len(masks) + call
    if one <= float(np.count_nonzero(masks)) + 4 * call:  # no split into two or more groups could do better
        return np.full(len(masks), together if together != -1 else -2)
    cover = table.cover(masks)
    cover[masks.all(axis=1)] = -2
    split = float(sizes[cover].sum()) + 2 * call * len(np.unique(cover))
    if one <= split:
        return np.full(len(masks), together if together != -1 else -2)
    return cover


#: The fixed cost of one conv call in MACs (~25 µs of a core), weighed against computing extra channels
#: when a batch part could run as one call instead of several.
CALL_COST_MACS = 1.0e6


def _masked_dense(step: ConvStep, x: Compact, masks: np.ndarray | None) -> Compact:
    """Every filter for a part, then each image's mask applied; kept as the channels any image keeps."""
    g = step.geometry
    step.counts["dense"] += 1
    y = step.full.run(x.dense()) if g.regular else g.conv(x.dense(), g.weight, g.bias, g.groups)
    if masks is None or masks.all():
        return Compact.of(y)
    union = masks.any(axis=0)
    idx = np.flatnonzero(union)
    if idx.size != union.size:
        y = take_channels(y, torch.from_numpy(idx))
    y = y.mul_(torch.from_numpy(masks[:, idx].astype(np.float32)).view(len(masks), idx.size, 1, 1))
    return Compact.from_mask(y, union, idx)


def channelwise(value: Grouped, fn) -> Grouped:
    return value.map(lambda c: c.with_values(fn(c.values)))


def grouped_flatten(value: Grouped) -> Grouped:
    return value.map(lambda c: _compact(flatten(c)))


def grouped_linear(module, value: Grouped) -> Grouped:
    return value.map(lambda c: linear(module, c))


def _compact(value) -> Compact:
    return value if value.__class__ is Compact else Compact.of(value)


def grouped_add(a: Grouped, b: Grouped, writable: tuple[bool, bool] = (False, False)) -> Grouped:
    """Residual add of two batches: part by part where they are grouped alike, else on the parts they
    have in common (images selected from both operands, which are then copies and writable)."""
    if len(a.parts) == len(b.parts) and all(ra is rb or np.array_equal(ra, rb) for (ra, _), (rb, _) in zip(a.parts, b.parts)):
        return Grouped([(ra, add(ca, cb, writable)) for (ra, ca), (_, cb) in zip(a.parts, b.parts)], a.size)
    part_b = np.empty(b.size, dtype=np.int64)
    place_b = np.empty(b.size, dtype=np.int64)
    for j, (rows, _) in enumerate(b.parts):
        part_b[rows], place_b[rows] = j, np.arange(rows.size)
    out = []
    for rows_a, ca in a.parts:
        owners = part_b[rows_a]
        for j in np.unique(owners):
            chosen = np.flatnonzero(owners == j)
            xa = _images(ca, chosen)
            cb = b.parts[j][1]
            xb = _images(cb, place_b[rows_a[chosen]])
            out.append((rows_a[chosen], add(xa, xb, (xa is not ca or writable[0], xb is not cb or writable[1]))))
    return Grouped(out, a.size)
