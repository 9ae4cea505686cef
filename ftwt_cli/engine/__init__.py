"""Sparse inference: compute only the filters an FTWT model's heads keep, from only its active inputs.

:func:`build_engine` turns an :class:`~ftwt_cli.core.gating.FTWTModel` (or a dense backbone, the identity
case) into a :class:`SparseEngine`, a batch-1 module whose outputs equal the gated model's. The parts,
from the data up:

* :mod:`~ftwt_cli.engine.geometry` — what one BN-folded conv is (fused weights laid out for slicing,
  shapes); the one BN fold;
* :mod:`~ftwt_cli.engine.compact` — compact activations (kept channels + their indices), residual add,
  flatten, linear;
* :mod:`~ftwt_cli.engine.cache` — the LRU cache of sliced weights;
* :mod:`~ftwt_cli.engine.subconv` — sub-convs: a conv's weights sliced to channel sets and laid out once;
* :mod:`~ftwt_cli.engine.prototypes` — per conv, prototype channel sets covering its masks (fit, cover);
* :mod:`~ftwt_cli.engine.heads` — decision heads on compact inputs (fast affine path, any variant);
* :mod:`~ftwt_cli.engine.cost` — the cost model that picks a path per call, and its calibration;
* :mod:`~ftwt_cli.engine.core` — static cores fitted on sample images;
* :mod:`~ftwt_cli.engine.conv` — one conv step: geometry, head and per-call state, with its paths;
* :mod:`~ftwt_cli.engine.fitting` — pre-sliced sub-networks fitted on held-out images, under a memory cap;
* :mod:`~ftwt_cli.engine.batched` — batches grouped per layer by the prototype their images run;
* :mod:`~ftwt_cli.engine.liveness` — which residual-add operands may be overwritten;
* :mod:`~ftwt_cli.engine.reference` — dense references (BN folded, optionally masked by the heads);
* :mod:`~ftwt_cli.engine.choice` — never slower than dense: the per-layer and whole-engine choice;
* :mod:`~ftwt_cli.engine.nodes` — what each traced node becomes (batch 1 and batched steps);
* :mod:`~ftwt_cli.engine.program` — fx tracing, compilation into flat programs, :class:`SparseEngine`;
* :mod:`~ftwt_cli.engine.latency` — batch-1 latency against the dense model (``ftwt eval --latency``);
* :mod:`~ftwt_cli.engine.throughput` — batched throughput against the dense model.
"""

from ftwt_cli.engine.cache import WeightCache
from ftwt_cli.engine.compact import Compact
from ftwt_cli.engine.conv import STRATEGIES, ConvStep
from ftwt_cli.engine.cost import CORE_THRESHOLD, GATHER_COST_MACS
from ftwt_cli.engine.program import DEFAULT_MEMORY_MB, SparseEngine, build_engine
from ftwt_cli.engine.reference import DenseModel, dense_fallback, folded_dense

__all__ = [
    "CORE_THRESHOLD",
    "DEFAULT_MEMORY_MB",
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
