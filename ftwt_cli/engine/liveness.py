"""Which residual-add operands the engine may overwrite: those whose tensor no later step reads.

The engine's program runs nodes in graph order over numbered slots. An add may write its sum into an
operand's tensor when every slot that may share that tensor's storage (the operand itself, and what
channel-wise or pass-through ops made of it, which may be views or in-place results) has no user after
the add, and the tensor is the engine's own (not the caller's input, not a module attribute). That
saves cloning the residual stream at every block.
"""

from __future__ import annotations

import torch.fx
from torch.fx.node import map_arg


class _Groups:
    """Union-find over slots: tensors that may share storage; a group holding the input is never written."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.external: set[int] = set()

    def find(self, slot: int) -> int:
        self.parent.setdefault(slot, slot)
        while self.parent[slot] != slot:
            self.parent[slot] = self.parent[self.parent[slot]]
            slot = self.parent[slot]
        return slot

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            if rb in self.external:
                self.external.add(ra)

    def members(self, slot: int) -> list[int]:
        root = self.find(slot)
        return [s for s in list(self.parent) if self.find(s) == root]


def _inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    map_arg((node.args, node.kwargs), lambda n: found.append(n))
    return found


def writable_operands(order: list[torch.fx.Node], slot: dict[torch.fx.Node, int], kind: dict[torch.fx.Node, str]) -> dict[torch.fx.Node, tuple[bool, bool]]:
    """Per add node of ``order`` (the program's nodes in run order), whether each of its two operands may
    be overwritten. ``kind[node]``: "fresh" (a new tensor: convs, linears), "alias" (may share its
    inputs' storage: channel-wise and pass-through ops), "external" (the input, attributes) or "add"."""
    last_use: dict[int, int] = {}
    for t, node in enumerate(order):
        for source in _inputs(node):
            last_use[slot[source]] = t
    groups = _Groups()
    writable: dict[torch.fx.Node, tuple[bool, bool]] = {}
    for t, node in enumerate(order):
        here = slot[node]
        groups.find(here)
        what = kind.get(node, "alias")
        if what == "external":
            groups.external.add(groups.find(here))
        elif what == "alias":
            for source in _inputs(node):
                groups.union(here, slot[source])
        elif what == "add":
            flags = []
            for operand in node.args[:2]:
                group = groups.members(slot[operand])
                free = groups.find(slot[operand]) not in groups.external and all(last_use.get(s, -1) <= t for s in group)
                flags.append(bool(free))
            if node.args[0] is node.args[1]:
                flags = [False, False]
            writable[node] = (flags[0], flags[1])
            for operand, flag in zip(node.args[:2], flags):
                if flag:  # the sum may live in this operand's tensor
                    groups.union(here, slot[operand])
    return writable
