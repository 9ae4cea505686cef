"""Build and run: the plan's sub-convs sliced, BN-folded and packed once, then a flat program over slots.

Run, per conv: pool the input once (shared by every head that reads it), route each image to the
prototype its head selects (one small scorer), run that prototype's pre-packed sub-conv on the
images that chose it. Channel-wise layers act on the compact values; residual adds write compact
outputs into the dense stream in place (:mod:`~ftwt_cli.engine.liveness`); anything else sees full
width. Nothing is decided per call but which of K.
"""

from __future__ import annotations

import operator

import torch
from torch import nn
from torch.fx.node import map_arg

from ftwt_cli.core.gating import FTWTModel
from ftwt_cli.core.targets import top_count_mask
from ftwt_cli.engine import values as V
from ftwt_cli.engine.geometry import fold
from ftwt_cli.engine.kernels import Shape, SubConv, packing_available, packing_pays
from ftwt_cli.engine.liveness import writable_operands
from ftwt_cli.engine.plan import ConvPlan, Plan, make_plan
from ftwt_cli.engine.reference import folded_dense
from ftwt_cli.engine.routing import Router, pooling


class ConvStep:
    """One planned conv, built: sub-convs [j][k] and, when routed, its router."""

    def __init__(self, plan: ConvPlan, pack: bool) -> None:
        self.plan = plan
        conv = plan.conv
        weight, bias = fold(conv, plan.bn)
        depthwise = conv.groups == conv.in_channels == conv.out_channels
        shape = Shape(tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), tuple(conv.kernel_size), conv.groups, depthwise, plan.in_hw)
        self.sub = [[SubConv(weight, bias, out, in_set, shape, plan.activation, pack) for out in plan.out_sets] for in_set in plan.in_sets]
        self.router = Router(plan.block.head, plan.block.codebook, plan.in_sets, conv.in_channels) if plan.mode == "routed" else None
        self.head = plan.block.head.eval() if plan.mode == "masked" else None
        self.pool = pooling(plan.block.head) if plan.block is not None else None
        self.last: tuple[int, list[V.Group]] | None = None  # (batch, how it was routed) or (batch, masks)
        self.channels = plan.out_sets

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for row in self.sub for s in row)

    def __call__(self, x, pooled_cache: dict, slot: int):
        if isinstance(x, V.Routed) and self.plan.producer is None:  # planned on the dense input (a grouped conv)
            x, slot = V.dense(x), -1 - slot  # a pooled cache entry of its own
        if self.router is not None:
            return self._routed(x, pooled_cache, slot)
        if isinstance(x, V.Routed):  # a plain conv reading a routed block: one sub-conv per input set
            return self._plain_from_routed(x)
        y = self.sub[0][0](x)
        if self.head is not None:  # free masks: the dense conv, then the head's mask
            block = self.plan.block
            logits = self.head(x)
            if block.keep_count is not None:
                mask = top_count_mask(logits, block.keep_count)
            else:
                mask = logits > 0
            self.last = (x.shape[0], mask)
            y = y.mul_(mask[:, :, None, None].to(y.dtype))
        return y

    def _pooled(self, x, pooled_cache: dict, slot: int) -> list[torch.Tensor]:
        key = (slot, self.router.pool_key)
        found = pooled_cache.get(key)
        if found is None:
            groups = x.groups if isinstance(x, V.Routed) else [V.Group(None, 0, x)]
            found = pooled_cache[key] = [self.pool(g.values) for g in groups]
        return found

    def _routed(self, x, pooled_cache: dict, slot: int) -> V.Routed:
        pooled = self._pooled(x, pooled_cache, slot)
        batch = x.batch if isinstance(x, V.Routed) else x.shape[0]
        groups_in = x.groups if isinstance(x, V.Routed) else [V.Group(None, 0, x)]
        out: list[V.Group] = []
        if batch == 1:  # one image, one group: the choice is made in numpy (see Router.choose_one)
            g = groups_in[0]
            k = self.router.choose_one(pooled[0], g.k)
            out.append(V.Group(None, k, self.sub[g.k][k](g.values)))
        else:
            for g, p in zip(groups_in, pooled):
                choice = self.router.choose(p, g.k)
                for k in torch.unique(choice).tolist():  # images grouped by the prototype they chose
                    local = torch.nonzero(choice == k).flatten()
                    if local.numel() == choice.numel():
                        out.append(V.Group(g.images, k, self.sub[g.k][k](g.values)))
                    else:
                        images = local if g.images is None else g.images[local]
                        out.append(V.Group(images, k, self.sub[g.k][k](g.values.index_select(0, local))))
        self.last = (batch, out)
        return V.Routed(out, self.channels, self.plan.conv.out_channels, batch)

    def _plain_from_routed(self, x: V.Routed) -> torch.Tensor:
        if len(x.groups) == 1 and x.groups[0].images is None:
            return self.sub[x.groups[0].k][0](x.groups[0].values)
        parts = [(g.images, self.sub[g.k][0](g.values)) for g in x.groups]
        first = parts[0][1]
        out = first.new_empty((x.batch, *first.shape[1:]))
        if first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        for images, y in parts:
            out.index_copy_(0, images, y)
        return out

    def masks(self) -> torch.Tensor | None:
        """bool [B, C_out] of the last call (None before any call or for a plain conv)."""
        if self.last is None:
            return None
        batch, how = self.last
        if isinstance(how, torch.Tensor):
            return how
        return V.masks_of(how, self.plan.block.codebook.prototypes > 0, batch)


class RoutingEngine(nn.Module):
    """An FTWT model (or a dense backbone) run from its pre-packed sub-networks; see :mod:`ftwt_cli.engine`."""

    def __init__(self, plan: Plan, pack: bool = True) -> None:
        super().__init__()
        self.plan = plan
        self.pack = pack
        # oneDNN's packed convs run on channels-last activations; F.conv2d's fastest small convs on the default
        self.channels_last = pack and packing_available()
        self.steps: dict[torch.fx.Node, ConvStep] = {node: ConvStep(p, pack) for node, p in plan.convs.items()}
        self.blocks = sorted((s for s in self.steps.values() if s.plan.block_index is not None), key=lambda s: s.plan.block_index)
        modules = dict(plan.graph_module.named_modules())
        kinds = {n: ("fresh" if plan.roles[n] == "conv" else "add" if plan.roles[n] == "add" else "external" if plan.roles[n] == "input" else "alias") for n in plan.order}
        writable = writable_operands(plan.order, plan.slot, kinds)
        self.program = [(plan.slot[n], self._compile(n, modules, writable.get(n, (False, False)))) for n in plan.order]
        self.num_slots = max(plan.slot.values()) + 1

    @property
    def routed(self) -> bool:
        return self.plan.routed

    def subnet_memory_mb(self) -> float:
        """Memory of every sub-conv's weights (pre-packed layouts included), MiB."""
        return sum(s.nbytes for s in self.steps.values()) / 2**20

    def subconv_count(self) -> int:
        return sum(len(row) for s in self.steps.values() for row in s.sub)

    def block_masks(self) -> list[torch.Tensor]:
        """Kept-output masks (bool [C]) of the last image of the last call, in block order."""
        return [m[-1] for m in self.batch_masks()]

    def batch_masks(self) -> list[torch.Tensor]:
        """Kept-output masks (bool [B, C]) of every image of the last call, in block order."""
        return [s.masks() for s in self.blocks]

    def _compile(self, node, modules: dict, writable: tuple[bool, bool]):
        slot, role = self.plan.slot, self.plan.roles[node]
        if role == "input":
            return lambda s, pooled: s[-1]
        if role == "output":
            return lambda s, pooled: map_arg(node.args[0], lambda n: V.dense(s[slot[n]]))
        if role == "conv":
            step, i = self.steps[node], slot[node.args[0]]
            return lambda s, pooled: step(s[i], pooled, i)
        if role == "add":
            i, j = slot[node.args[0]], slot[node.args[1]]
            return lambda s, pooled: V.add(s[i], s[j], writable)
        module = modules.get(node.target) if node.op == "call_module" else None
        if node.op == "call_module":
            op = module.forward if not (module._forward_hooks or module._forward_pre_hooks) else module
        elif node.op == "call_function":
            op = node.target
        elif node.op == "get_attr":
            value = operator.attrgetter(node.target)(self.plan.graph_module)  # a dotted path into a submodule
            return lambda s, pooled: value
        else:
            op = lambda self_, *a, **k: getattr(self_, node.target)(*a, **k)  # noqa: E731
        if role == "channelwise":
            i, rest, kwargs = slot[node.args[0]], tuple(node.args[1:]), node.kwargs

            def channelwise(s, pooled):
                x = s[i]
                if isinstance(x, V.Routed):
                    return x.map(lambda v: op(v, *rest, **kwargs))
                return op(x, *rest, **kwargs)

            return channelwise

        def dense_node(s, pooled):
            args = map_arg(node.args, lambda n: V.dense(s[slot[n]]))
            kwargs = map_arg(node.kwargs, lambda n: V.dense(s[slot[n]]))
            return op(*args, **kwargs)

        return dense_node

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()
        s: list = [None] * self.num_slots + [x]
        pooled: dict = {}
        for out, step in self.program:
            s[out] = step(s, pooled)
        return s[self.program[-1][0]]


def build_engine(model: nn.Module, input_size: tuple[int, int] | None = None, pack: bool | None = None) -> RoutingEngine:
    """The routing engine of an eval-mode :class:`FTWTModel` (its codebooks routed, or free masks run
    exactly on dense convs) or of a dense backbone (BN folded: the pre-packed dense reference). ``pack``:
    oneDNN's pre-packed convs on channels-last activations (True), the same sub-convs through
    ``F.conv2d`` in the default format (False, and what a build without oneDNN does), or None: packed
    where the model's convs are large enough for it to pay (:func:`~ftwt_cli.engine.kernels.packing_pays`)."""
    if isinstance(model, FTWTModel):
        input_size = model.graph.input_size
        model.eval()
        plan = make_plan(model, tuple(input_size))
    else:
        if input_size is None:
            raise ValueError("a dense backbone needs input_size=(H, W)")
        plan = make_plan(folded_dense(model, tuple(input_size)), tuple(input_size))
    if pack is None:
        pack = packing_pays([(p.conv, _out_hw(node)) for node, p in plan.convs.items()])
    return RoutingEngine(plan, pack).eval()


def _out_hw(node) -> tuple[int, int]:
    return tuple(node.meta["tensor_meta"].shape[2:])
