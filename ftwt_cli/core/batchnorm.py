"""BatchNorm modules as ftwt reads them: a plain ``nn.BatchNorm2d``, or a BN with its activation fused
in (timm's ``BatchNormAct2d``: normalise, dropout, activation in one module), which a gated block
splits into the BN it folds and the tail it leaves in the backbone; and fx tracing in eval mode with
every BN module a leaf, so that the traced graph never depends on batch statistics.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

#: Layers a fused BN module may apply after normalising, in eval mode none of them changes a value.
_EVAL_IDENTITY = (nn.Identity, nn.Dropout, nn.Dropout2d)


class FusedTail(nn.Module):
    """What a fused BN+activation module does after normalising (dropout, then the activation); it
    takes the module's place when its BN moves into a gated block. Attribute names are the fused
    module's, so parameterised activations keep their state-dict keys."""

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def split_batchnorm(bn: nn.BatchNorm2d) -> tuple[nn.BatchNorm2d, nn.Module] | None:
    """(plain BN sharing ``bn``'s parameters and buffers, what comes after it) for a BN module; None if
    ``bn`` is a BatchNorm2d subclass whose forward is not act(drop(BN(x))) (it is then not a block's BN).

    A plain ``nn.BatchNorm2d`` splits into itself and ``nn.Identity``. A subclass with ``act`` (and
    optionally ``drop``) submodules, timm's ``BatchNormAct2d`` for instance, is checked on a probe in
    eval mode: the split must compute exactly what the module does.
    """
    if type(bn) is nn.BatchNorm2d:
        return bn, nn.Identity()
    act, drop = getattr(bn, "act", None), getattr(bn, "drop", None) or nn.Identity()
    if not isinstance(act, nn.Module) or not isinstance(drop, _EVAL_IDENTITY):
        return None
    plain = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    for name in ("weight", "bias"):  # shared, not copied: training the block trains the backbone's BN
        setattr(plain, name, getattr(bn, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(plain, name, getattr(bn, name))
    tail = FusedTail(drop, act)
    param = bn.running_mean if bn.running_mean is not None else next(bn.parameters(), torch.zeros(()))
    probe = torch.randn(2, bn.num_features, 3, 3, generator=torch.Generator().manual_seed(0)).to(param)
    was_training = bn.training
    bn.eval(), plain.eval()
    try:
        with torch.no_grad():
            same = torch.allclose(bn(probe.clone()), tail(plain(probe.clone())), rtol=1e-5, atol=1e-6)
    except Exception:  # noqa: BLE001 - a module that cannot even run the probe is not a fused BN we know
        same = False
    finally:
        bn.train(was_training), plain.train(was_training)
    return (plain, tail) if same else None


class LeafTracer(torch.fx.Tracer):
    """fx tracing with every BatchNorm module a leaf (fused BN+activation modules stay one node), and
    every submodule whose forward fx cannot trace (control flow on shapes or values, as in timm's VGG
    head) a leaf too: the graph runs it as one opaque call instead of failing as a whole."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, nn.modules.batchnorm._BatchNorm) or super().is_leaf_module(m, qualified_name)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if self.is_leaf_module(m, self.path_of_module(m)):
            return super().call_module(m, forward, args, kwargs)
        before = list(self.graph.nodes)[-1] if len(self.graph.nodes) else None
        try:
            return super().call_module(m, forward, args, kwargs)
        except torch.fx.proxy.TraceError:
            # Drop what the failed attempt added (nodes after ``before``), then record one call.
            for node in reversed(list(self.graph.nodes)):
                if node is before:
                    break
                self.graph.erase_node(node)
            return self.create_proxy("call_module", self.path_of_module(m), args, kwargs)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """``model`` traced by fx in eval mode (branches on ``self.training`` follow inference), BN modules as leaves."""
    was_training = model.training
    model.eval()
    try:
        return torch.fx.GraphModule(model, LeafTracer().trace(model))
    finally:
        model.train(was_training)
