"""The FTWT core: targets, decision heads, gating, graph tracing, FLOPs accounting, mask statistics.

It imports torch (and numpy) only, never another part of ftwt: every command, algorithm and the engine
stand on it. See docs/design.md for the layers above.
"""

from ftwt_cli.core.flops import FlopsCounter
from ftwt_cli.core.gating import FTWTModel, GatedBlock, head_loss, truth_masks
from ftwt_cli.core.graph import ModelGraph, analyze
from ftwt_cli.core.heads import HEADS, DecisionHead, HeadSpec
from ftwt_cli.core.masks import MaskStats
from ftwt_cli.core.targets import TARGETS, make_target

__all__ = [
    "HEADS",
    "TARGETS",
    "DecisionHead",
    "FTWTModel",
    "FlopsCounter",
    "GatedBlock",
    "HeadSpec",
    "MaskStats",
    "ModelGraph",
    "analyze",
    "head_loss",
    "make_target",
    "truth_masks",
]
