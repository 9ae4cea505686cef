"""Static pruning baselines through torch-pruning: the comparisons FTWT has to win (paper Tables 1 and 6).

Layering follows torch-pruning's own: its ``DependencyGraph`` says which layers are coupled (residual
adds, depthwise convs, BN), its importance criteria say which filters matter, and this package only
decides how many filters go so that ftwt's own MAC accounting (:mod:`ftwt_cli.core.flops`) reaches a
target. ``groups`` wraps the graph, ``methods`` holds the registered methods, ``signature`` the
predefined per-layer counts, ``core`` the static core of a calibrated FTWT model (``ftwt export --static-core``).

A pruned model is stored without pickling modules: the checkpoint meta carries torch-pruning's
pruning history (module names and removed indices, plain lists), and :func:`restore` replays it on a
freshly created dense model before the state dict is loaded.
"""

from ftwt_cli.algorithms.static.core import CoreHead, CoreSpec, build_core, forced_reference, keep_rates, restore_core
from ftwt_cli.algorithms.static.groups import macs_of, plain_history, restore, unprunable_convs
from ftwt_cli.algorithms.static.methods import (
    STATIC_METHODS,
    TAYLOR_BATCHES,
    StaticResult,
    counts,
    taylor,
    uniform,
)
from ftwt_cli.algorithms.static.signature import apply_signature, read_signature, signature_macs

__all__ = [
    "CoreHead",
    "CoreSpec",
    "build_core",
    "forced_reference",
    "keep_rates",
    "restore_core",
    "STATIC_METHODS",
    "TAYLOR_BATCHES",
    "StaticResult",
    "apply_signature",
    "counts",
    "macs_of",
    "plain_history",
    "read_signature",
    "restore",
    "signature_macs",
    "taylor",
    "uniform",
    "unprunable_convs",
]
