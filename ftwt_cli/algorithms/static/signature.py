"""Predefined signatures (the paper's Table 6): per-layer kept-filter counts, fixed in advance.

The same counts serve a dynamic model (every head keeps exactly its block's k highest logits per
image, trained towards the top-k of the block's responses) and its static counterpart
(:func:`~ftwt_cli.algorithms.static.methods.counts`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ftwt_cli.core.flops import FlopsCounter
from ftwt_cli.core.gating import FTWTModel
from ftwt_cli.core.graph import ModelGraph
from ftwt_cli.core.targets import FixedCountTarget, Target
from ftwt_cli.errors import BadInput


def read_signature(path: str, block_convs: dict[str, int]) -> dict[str, int]:
    """A signature file: JSON ``{"block conv name": kept filters, ...}``; ``block_convs`` maps names to widths.

    Blocks the file leaves out keep every filter.
    """
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BadInput(f"signature file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise BadInput(f"signature file {path} is not valid JSON: {exc}") from None
    if isinstance(doc, dict) and isinstance(doc.get("kept_filters"), dict):
        doc = doc["kept_filters"]  # a static checkpoint's or run's record works as a file too
    if not isinstance(doc, dict) or not doc:
        raise BadInput(f"signature file {path} must map gated block names to kept-filter counts")
    unknown = sorted(set(doc) - set(block_convs))
    if unknown:
        raise BadInput(
            f"signature file {path} names {unknown[0]!r}, which is not a gated block "
            f"(blocks: {', '.join(list(block_convs)[:6])}...)"
        )
    result = dict(block_convs)
    for name, count in doc.items():
        if not isinstance(count, int) or isinstance(count, bool) or not (1 <= count <= block_convs[name]):
            raise BadInput(f"signature file {path}: {name} must keep 1..{block_convs[name]} filters, got {count!r}")
        result[name] = count
    return result


def signature_macs(graph: ModelGraph, kept: dict[str, int]) -> float:
    """MACs of a dense graph when every block keeps ``kept`` filters (ftwt's accounting, per sample)."""
    masks = []
    for block in graph.blocks:
        mask = torch.zeros(1, block.out_channels, dtype=torch.bool)
        mask[0, : kept[block.conv]] = True
        masks.append(mask)
    return float(FlopsCounter(graph).macs_from_masks(masks)[0])


def apply_signature(model: FTWTModel, kept: dict[str, int]) -> list[Target]:
    """Fix every gated block of an FTWT model to keep ``kept[conv]`` channels per sample (top-k routing).

    Returns the per-block top-k targets the heads are trained towards.
    """
    names = [b.conv for b in model.graph.blocks]
    missing = [n for n in names if n not in kept]
    if missing:
        raise BadInput(f"the signature has no count for gated block {missing[0]!r}")
    counts = [int(kept[n]) for n in names]
    targets = [FixedCountTarget(k) for k in counts]
    model.configure(keep_counts=counts, target=targets)
    return targets


