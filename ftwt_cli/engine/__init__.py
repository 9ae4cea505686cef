"""The routing engine: an FTWT model whose blocks route each image among K prototype sub-networks
(``--codebook K``), run from sub-convs sliced, BN-folded and pre-packed once. Plan → build → run:

* :mod:`~ftwt_cli.engine.plan` — trace the model once; which sub-convs exist (K, or K_in × K, per conv),
  which activations fuse into them;
* :mod:`~ftwt_cli.engine.kernels` — one sub-conv: weights sliced once, oneDNN pre-packed with the
  activation fused (or ``F.conv2d`` where oneDNN is missing);
* :mod:`~ftwt_cli.engine.routing` — a block's head folded into a K × C_in scorer per input set;
* :mod:`~ftwt_cli.engine.values` — dense tensors and routed groups, residual adds into the stream;
* :mod:`~ftwt_cli.engine.liveness` — which residual-add operands may be overwritten;
* :mod:`~ftwt_cli.engine.program` — build and run (:class:`RoutingEngine`, :func:`build_engine`);
* :mod:`~ftwt_cli.engine.geometry`, :mod:`~ftwt_cli.engine.reference` — the BN fold; dense references;
* :mod:`~ftwt_cli.engine.scripted` — the same routing as one TorchScript program (``ftwt export``);
* :mod:`~ftwt_cli.engine.latency`, :mod:`~ftwt_cli.engine.throughput` — batch-1 latency and batched
  throughput against dense eager and dense pre-packed.

A model with free per-image masks (no codebook) runs exactly, as its dense convs with the heads' masks
multiplied in: free masks would need weights moved on every call, which costs what it saves.
"""

from ftwt_cli.engine.kernels import SubConv, packing_available
from ftwt_cli.engine.program import RoutingEngine, build_engine
from ftwt_cli.engine.reference import DenseModel, dense_fallback, folded_dense

__all__ = ["DenseModel", "RoutingEngine", "SubConv", "build_engine", "dense_fallback", "folded_dense", "packing_available"]
