"""Prototype channel sets: per conv, a few output channel sets that cover the masks its head predicts.

Where heads are accurate, a layer's masks are few. A prototype is a superset of the masks it serves: a
call whose mask it covers runs the prototype's pre-sliced sub-conv and zeroes the extra channels, so
outputs stay exact (the gated model multiplies those channels by 0 too). At run time the mask picks the
cheapest covering prototype by a bit test; a mask no prototype covers takes the per-call paths.

Fitting (:func:`fit_sets`): the distinct masks of held-out images, weighted by how often they occur,
merged greedily (agglomeration that adds the fewest computed channels) down to a few *leaves*; the
unions formed while merging the leaves further (their ancestors) are prototypes too, so that a mask
never seen, but inside a union, is still covered. How many leaves each layer gets is chosen under a
memory cap (:func:`allocate`). A block with a codebook (:mod:`ftwt_cli.core.codebook`) takes its
prototypes as they are: every image's mask is one of them.

Prototype sets travel as plain lists (:func:`to_lists` / :func:`from_lists`), e.g. in a checkpoint's meta.
"""

from __future__ import annotations

import numpy as np
import torch

#: Leaf counts tried per layer (each with the ancestors that merging its leaves forms).
LEAF_LEVELS = (1, 2, 4, 8)
#: Version of the plain-list form.
LISTS_FORMAT = 1
#: oneDNN lays channels out in blocks of 16 (AVX-512 floats): on its layers a prototype a few channels
#: short of a multiple of this is rounded up with the channels held-out masks keep most often, which
#: costs (almost) nothing there, often runs faster than the odd width and covers more masks.
CHANNEL_BLOCK = 16
#: ... when that adds at most this fraction of the prototype's channels (38 → 48 costs ~20 % more time).
ROUND_UP_AT_MOST = 1 / 12


class Prototypes:
    """One conv's prototype output sets (bool [K, C]), cheapest (fewest channels) first."""

    def __init__(self, sets: np.ndarray, source: str = "fitted") -> None:
        sets = np.asarray(sets, dtype=bool)
        if sets.ndim != 2 or sets.shape[0] == 0:
            raise ValueError(f"prototype sets must be a non-empty [K, C] mask, got shape {sets.shape}")
        order = np.argsort(sets.sum(axis=1), kind="stable")
        self.sets = np.ascontiguousarray(sets[order])
        self.sizes = self.sets.sum(axis=1)
        self.source = source
        self.idx = [np.flatnonzero(s) for s in self.sets]
        self.tidx = [torch.from_numpy(i) for i in self.idx]
        self.keys = [s.tobytes() for s in self.sets]
        self.outside = np.packbits(~self.sets, axis=1)  # [K, C/8]: the channels each prototype lacks
        self.outside_bits = [int.from_bytes(row.tobytes(), "big") for row in self.outside]  # the same, as ints

    def __len__(self) -> int:
        return len(self.sets)

    @property
    def width(self) -> int:
        return self.sets.shape[1]

    def cover_one(self, mask: np.ndarray) -> int:
        """:meth:`cover` of one mask (bool [C]) with Python ints as bit sets (a few µs at batch 1)."""
        bits = int.from_bytes(np.packbits(mask).tobytes(), "big")
        for k, outside in enumerate(self.outside_bits):
            if not bits & outside:
                return k
        return -1

    def cover(self, masks: np.ndarray) -> np.ndarray:
        """int [n]: per mask (bool [n, C]), the cheapest prototype holding all its channels, or -1."""
        packed = np.packbits(masks, axis=1)
        fits = ~(packed[:, None, :] & self.outside[None]).any(axis=2)  # [n, K]
        first = fits.argmax(axis=1)
        return np.where(fits[np.arange(len(masks)), first], first, -1)


def merge_levels(masks: np.ndarray, levels=LEAF_LEVELS) -> dict[int, list[np.ndarray]]:
    """Per leaf count L of ``levels``, prototype sets for ``masks`` (bool [n, C], held-out images): the
    (at most) L clusters left when merging the distinct masks, plus every union formed by merging those
    L clusters on down to one; the full set left out (running every filter needs no prototype).

    One agglomeration serves every L: each step merges the two clusters whose union adds the fewest
    computed channels, weighted by the images in each (``(wa + wb)·|A∪B| − wa·|A| − wb·|B|``).
    """
    distinct, counts = np.unique(np.asarray(masks, dtype=bool), axis=0, return_counts=True)
    sets = list(distinct)
    weight = counts.astype(np.float64)
    size = distinct.sum(axis=1).astype(np.float64)
    rows = distinct.astype(np.float32)
    alive = np.ones(len(sets), dtype=bool)
    # Pairwise merge costs, kept up to date row by row (O(m·C) per merge, m ≤ held-out images).
    union = size[:, None] + size[None, :] - rows @ rows.T
    cost = (weight[:, None] + weight[None, :]) * union - (weight * size)[:, None] - (weight * size)[None, :]
    np.fill_diagonal(cost, np.inf)
    # Per leaf count: the clusters alive when their number first fell to it, and how many unions
    # had been formed by then (the later ones are its ancestors).
    snapshots: dict[int, tuple[list[np.ndarray], int]] = {}
    created: list[np.ndarray] = []
    remaining = len(sets)
    for leaves in levels:
        if remaining <= leaves:
            snapshots[leaves] = (list(distinct), 0)
    while remaining > 1:
        a, b = np.unravel_index(int(np.argmin(cost)), cost.shape)
        merged = sets[a] | sets[b]
        sets[a], alive[b] = merged, False
        weight[a] += weight[b]
        size[a] = merged.sum()
        rows[a] = merged
        cost[b, :] = cost[:, b] = np.inf
        union_a = size[a] + size - rows @ rows[a]
        cost[a, :] = cost[:, a] = (weight[a] + weight) * union_a - weight[a] * size[a] - weight * size
        cost[a, ~alive] = cost[~alive, a] = np.inf
        cost[a, a] = np.inf
        created.append(merged)
        remaining -= 1
        for leaves in levels:
            if leaves not in snapshots and remaining <= leaves:
                snapshots[leaves] = ([sets[i].copy() for i in np.flatnonzero(alive)], len(created))
    out: dict[int, list[np.ndarray]] = {}
    for leaves in levels:
        base, done = snapshots[leaves]
        found: list[np.ndarray] = []
        for s in [*base, *created[done:]]:
            if not s.all() and not any(np.array_equal(s, f) for f in found):
                found.append(s)
        out[leaves] = found
    return out


def fit_sets(masks: np.ndarray, leaves: int) -> list[np.ndarray]:
    """Prototype sets for ``masks`` with at most ``leaves`` leaf clusters (see :func:`merge_levels`)."""
    return merge_levels(masks, (leaves,))[leaves]


def round_up(sets: list[np.ndarray], frequency: np.ndarray, block: int) -> list[np.ndarray]:
    """Each set a few channels short of a multiple of ``block`` (at most :data:`ROUND_UP_AT_MOST` of its
    size) grown to it with the most often kept channels it lacks (``frequency``: per channel, the share
    of held-out masks keeping it); duplicates and full sets dropped."""
    order = np.argsort(-frequency, kind="stable")
    out: list[np.ndarray] = []
    for s in sets:
        missing = -int(s.sum()) % block
        if missing and missing <= ROUND_UP_AT_MOST * s.sum():
            s = s.copy()
            s[order[~s[order]][:missing]] = True
        if not s.all() and not any(np.array_equal(s, f) for f in out):
            out.append(s)
    return out


def mean_cost(prototypes: list[np.ndarray], masks: np.ndarray) -> float:
    """Mean fraction of a layer's filters computed for ``masks`` with these prototypes (uncovered: all)."""
    if not prototypes:
        return 1.0
    table = Prototypes(np.stack(prototypes))
    cover = table.cover(masks)
    sizes = table.sets.sum(axis=1) / table.width
    return float(np.where(cover >= 0, sizes[np.maximum(cover, 0)], 1.0).mean())


def allocate(layers: list[dict], budget_bytes: float) -> list[list[np.ndarray]]:
    """Per layer, the prototype sets to keep under ``budget_bytes``.

    ``layers``: per layer ``{"masks": bool [n, C], "macs": dense MACs, "bytes_per_channel": weight bytes
    of one output channel over the layer's usual inputs, "fixed": prototype sets that must stay (a
    codebook) or None, "block": channel block the sets are rounded up to (1: none)}``. Every layer starts without prototypes (charged as computing every filter);
    the upgrade to the next leaf count that saves the most MACs per byte is taken while it fits.
    """
    options = []
    for layer in layers:
        if layer.get("fixed") is not None:
            options.append([(0.0, 0.0, list(layer["fixed"]))])
            continue
        levels = [(1.0, 0.0, [])]
        block = layer.get("block", 1)
        for leaves, sets in sorted(merge_levels(layer["masks"]).items()):
            if block > 1:
                sets = round_up(sets, layer["masks"].mean(axis=0), block)
            fraction = mean_cost(sets, layer["masks"])
            if sets and fraction < levels[-1][0]:
                levels.append((fraction, sum(int(s.sum()) for s in sets) * layer["bytes_per_channel"], sets))
        options.append(levels)
    chosen = [0] * len(layers)
    used = sum(opts[0][1] for opts in options)
    while True:
        best = None
        for i, opts in enumerate(options):
            here = opts[chosen[i]]
            for j in range(chosen[i] + 1, len(opts)):
                extra = opts[j][1] - here[1]
                if used + extra > budget_bytes:
                    continue
                gain = (here[0] - opts[j][0]) * layers[i]["macs"]
                score = gain / max(extra, 1.0)
                if gain > 0 and (best is None or score > best[0]):
                    best = (score, i, j, extra)
        if best is None:
            break
        _, i, j, extra = best
        chosen[i], used = j, used + extra
    return [opts[c][2] for opts, c in zip(options, chosen)]


def to_lists(tables: dict[str, Prototypes]) -> dict:
    """Plain lists (JSON, checkpoint meta): ``{"format": 1, "layers": {conv name: [[channel, ...], ...]}}``."""
    return {
        "format": LISTS_FORMAT,
        "layers": {name: {"width": t.width, "sets": [i.tolist() for i in t.idx]} for name, t in tables.items()},
    }


def from_lists(document: dict) -> dict[str, np.ndarray]:
    """bool [K, C] prototype sets per conv name from :func:`to_lists`' form; ValueError when malformed."""
    if not isinstance(document, dict) or document.get("format") != LISTS_FORMAT or not isinstance(document.get("layers"), dict):
        raise ValueError(f"engine prototypes: expected {{'format': {LISTS_FORMAT}, 'layers': {{...}}}}")
    out = {}
    for name, entry in document["layers"].items():
        width, lists = entry.get("width"), entry.get("sets")
        if not isinstance(width, int) or width < 1 or not isinstance(lists, list) or not lists:
            raise ValueError(f"engine prototypes of {name}: need a positive width and a non-empty list of sets")
        sets = np.zeros((len(lists), width), dtype=bool)
        for k, channels in enumerate(lists):
            if not all(isinstance(c, int) and 0 <= c < width for c in channels):
                raise ValueError(f"engine prototypes of {name}: channel indices must lie in [0, {width})")
            sets[k, channels] = True
        out[name] = sets
    return out
