"""Plain names and defaults for help texts, importable without torch (``ftwt --help`` must not load it).

The registries they mirror (heads, targets, gates, static methods, export formats) live in modules that
import torch. Values are still validated against the registries when a command runs, so a name registered
by an extension works although help lists the built-in ones; ``tests/test_cli_startup.py`` checks these
lists against the registries.
"""

from __future__ import annotations

DEFAULT_PROFILE = "quickstart"  # ftwt_cli.io.config.DEFAULT_PROFILE
HEADS = ("paper",)  # ftwt_cli.core.heads.HEADS
TARGETS = {  # ftwt_cli.core.targets.TARGETS, name → help
    "mass": "cumulative mass r (the paper)",
    "topk": "a fixed kept fraction per layer (--ratio)",
}
GATES = ("all", "internal")  # ftwt_cli.core.graph.GATES
STATIC_METHODS = ("uniform", "taylor")  # ftwt_cli.algorithms.static.STATIC_METHODS
EXPORT_FORMATS = ("torchscript", "onnx", "pt2", "checkpoint")  # ftwt_cli.workflows.export.FORMATS
