"""Sparse inference: compute only the filters an FTWT model's heads keep, from only its active inputs.

:func:`build_engine` turns an :class:`~ftwt_cli.core.gating.FTWTModel` (or a dense backbone, the identity
case) into a :class:`SparseEngine`, a batch-1 module whose outputs equal the gated model's. The parts,
from the data up:

* :mod:`~ftwt_cli.engine.geometry` — what one BN-folded conv is (fused weights laid out for slicing,
  shapes); the one BN fold;
* :mod:`~ftwt_cli.engine.compact` — compact activations (kept channels + their indices), residual add,
  flatten, linear;
* :mod:`~ftwt_cli.engine.cache` — the LRU cache of sliced weights;
* :mod:`~ftwt_cli.engine.heads` — decision heads on compact inputs (numpy fast path, any variant);
* :mod:`~ftwt_cli.engine.cost` — the cost model that picks a path per call, and its calibration;
* :mod:`~ftwt_cli.engine.core` — static cores fitted on sample images;
* :mod:`~ftwt_cli.engine.conv` — one conv step: geometry, head and per-call state, with its paths;
* :mod:`~ftwt_cli.engine.reference` — dense references (BN folded, optionally masked by the heads);
* :mod:`~ftwt_cli.engine.choice` — never slower than dense: the per-layer and whole-engine choice;
* :mod:`~ftwt_cli.engine.program` — fx tracing, compilation into a flat program, :class:`SparseEngine`;
* :mod:`~ftwt_cli.engine.latency` — batch-1 latency against the dense model (``ftwt eval --latency``).

Batch-1 inputs are the target; a batch runs sample by sample (each sample has its own masks).
"""

from ftwt_cli.engine.cache import WeightCache
from ftwt_cli.engine.compact import Compact
from ftwt_cli.engine.conv import STRATEGIES, ConvStep
from ftwt_cli.engine.cost import CORE_THRESHOLD, GATHER_COST_MACS
from ftwt_cli.engine.program import SparseEngine, build_engine
from ftwt_cli.engine.reference import DenseModel, dense_fallback, folded_dense

__all__ = [
    "CORE_THRESHOLD",
    "GATHER_COST_MACS",
    "STRATEGIES",
    "Compact",
    "ConvStep",
    "DenseModel",
    "SparseEngine",
    "WeightCache",
    "build_engine",
    "dense_fallback",
    "folded_dense",
]
