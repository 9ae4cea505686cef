"""The routing model as one TorchScript program: what ``ftwt export --format torchscript`` writes for a
model whose blocks carry codebooks, so that the deployed file computes only the chosen prototypes.

The engine's plan is reused: every routed conv becomes a :class:`RoutedConv` holding its K (or K_in × K)
sub-conv weights, BN folded and sliced once, and the head folded into the K × C_in scorer the engine
uses. The traced graph is rewritten so that a routed conv also returns the prototype each image chose,
and the routed conv reading it receives that choice: it slices its input to the producer's prototype
(the other channels are zero) before convolving. Between layers the activations stay full width (the
dropped channels zero), so every other node of the graph runs unchanged. Kernels are ``F.conv2d`` on
the pre-sliced weights (TorchScript archives do not hold oneDNN's packed layouts).
"""

# No `from __future__ import annotations` here: TorchScript reads the class-body annotations.
import operator
import warnings
from typing import List, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ftwt_cli.core.gating import FTWTModel
from ftwt_cli.engine.geometry import fold
from ftwt_cli.engine.plan import ConvPlan, make_plan


class NotRoutable(ValueError):
    """The model cannot be exported as a routing program (no codebook, or a head without the affine form)."""


class RoutedConv(nn.Module):
    """One routed conv: choose a prototype per image, run its pre-sliced sub-conv, scatter to full width."""

    weights: List[torch.Tensor]  # [j · K + k]: sub-conv (input set j, prototype k), BN folded
    biases: List[torch.Tensor]
    inputs: List[torch.Tensor]  # the input channels each sub-conv reads
    outs: List[torch.Tensor]  # prototype k's output channels

    def __init__(self, plan: ConvPlan) -> None:
        super().__init__()
        conv, head, codebook = plan.conv, plan.block.head, plan.block.codebook
        form = head.affine()
        depthwise = conv.groups == conv.in_channels == conv.out_channels
        if form is None or (conv.groups != 1 and not depthwise) or head.pool_kind not in ("max", "avg"):
            raise NotRoutable(f"{plan.name}: its head or its grouped conv has no routing program (export it masked)")
        softmax, weight, bias = form
        signs = 2.0 * codebook.prototypes.float() - 1.0
        self.register_buffer("scorer", (signs @ weight.float()).t().contiguous())  # [C_in, K]
        self.register_buffer("offset", signs @ bias.float())
        self.softmax, self.max_pool = bool(softmax), head.pool_kind == "max"
        self.stride, self.padding, self.dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
        self.depthwise, self.out_channels = depthwise, conv.out_channels
        self.k = len(plan.out_sets)
        folded_w, folded_b = fold(conv, plan.bn)
        in_sets = [torch.arange(conv.in_channels) if s is None else s for s in plan.in_sets]
        self.routed_input = plan.producer is not None
        weights, biases, inputs = [], [], []
        for in_set in in_sets:
            for out in plan.out_sets:
                if depthwise:  # output c reads input c: take the prototype's own channels from the input
                    weights.append(folded_w[out].contiguous())
                    inputs.append(out)
                else:
                    weights.append(folded_w[out][:, in_set].contiguous())
                    inputs.append(in_set)
                biases.append(folded_b[out].contiguous())
        self.weights, self.biases, self.inputs = weights, biases, inputs
        self.outs = list(plan.out_sets)

    def forward(self, x: torch.Tensor, producer: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        pooled = x.amax(dim=(2, 3)) if self.max_pool else x.mean(dim=(2, 3))
        if self.softmax:
            pooled = pooled.softmax(dim=1)
        choice = (pooled @ self.scorer + self.offset).argmax(dim=1)
        j = producer if producer is not None and self.routed_input else torch.zeros_like(choice)
        pair = j * self.k + choice
        y: Optional[torch.Tensor] = None
        pairs: List[int] = torch.unique(pair).tolist()
        for p in pairs:
            images = torch.nonzero(pair == p).flatten()
            xs = x if images.numel() == x.shape[0] else x.index_select(0, images)
            xs = xs.index_select(1, self.inputs[p])
            groups = xs.shape[1] if self.depthwise else 1
            out = F.conv2d(xs, self.weights[p], self.biases[p], self.stride, self.padding, self.dilation, groups)
            if y is None:
                y = torch.zeros([x.shape[0], self.out_channels, out.shape[2], out.shape[3]], dtype=out.dtype)
            channels = self.outs[p % self.k]
            if images.numel() == x.shape[0]:
                y.index_copy_(1, channels, out)
            else:
                where: List[Optional[torch.Tensor]] = [images[:, None], channels[None, :]]
                y.index_put_(where, out)
        assert y is not None
        return y, choice


def routing_program(model: FTWTModel) -> torch.jit.ScriptModule:
    """``model`` (eval mode, every block with a codebook) as a scripted routing program."""
    if not all(b.codebook is not None for b in model.blocks):
        raise NotRoutable("the model's blocks have no codebook (free masks): route it first (ftwt calibrate --codebook K)")
    model.eval()
    plan = make_plan(model, tuple(model.graph.input_size))
    gm = plan.graph_module
    graph = gm.graph
    choices: dict[str, torch.fx.Node] = {}
    for node, conv in plan.convs.items():
        if conv.mode != "routed":
            continue
        name = f"routed_{len(choices)}"
        gm.add_submodule(name, RoutedConv(conv))
        with graph.inserting_after(node):
            args = (node.args[0], choices[conv.producer]) if conv.producer is not None else (node.args[0],)
            call = graph.call_module(name, args)
        with graph.inserting_after(call):
            value = graph.call_function(operator.getitem, (call, 0))
        with graph.inserting_after(value):
            choices[conv.name] = graph.call_function(operator.getitem, (call, 1))
        node.replace_all_uses_with(value, delete_user_cb=lambda user: user is not call)
        graph.erase_node(node)
    graph.lint()
    program = torch.fx.GraphModule(gm, graph)
    program.delete_all_unused_submodules()  # the gated blocks it replaced
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice
        return torch.jit.script(program.eval())
