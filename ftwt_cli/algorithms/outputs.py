"""What a model's training forward returns, reduced to its main logits and its auxiliary classifiers.

Most models return logits in both modes. Some return more while training: torchvision's GoogLeNet a
``GoogLeNetOutputs(logits, aux_logits2, aux_logits1)``, Inception v3 an ``InceptionOutputs(logits,
aux_logits)``; other code returns a tuple ``(logits, aux, ...)`` or an object with ``.logits``. Every
training loss reads them through :func:`training_outputs`: the main logits are scored (accuracy,
distillation, the heads' targets), each auxiliary classifier adds its cross-entropy at the weight of
torchvision's reference recipe (0.3 each for GoogLeNet, 0.4 for Inception v3, 0.3 for any other).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ftwt_cli.errors import BadInput

#: Weight of each auxiliary classifier's loss, by the type name of the training output (torchvision's recipes).
AUX_WEIGHTS = {"GoogLeNetOutputs": 0.3, "InceptionOutputs": 0.4}
DEFAULT_AUX_WEIGHT = 0.3


@dataclass
class TrainingOutputs:
    logits: torch.Tensor
    aux: list[torch.Tensor] = field(default_factory=list)
    aux_weight: float = DEFAULT_AUX_WEIGHT

    def loss(self, labels: torch.Tensor, main: torch.Tensor | None = None) -> torch.Tensor:
        """``main`` (default: cross-entropy of the logits) plus each auxiliary cross-entropy, weighted."""
        total = F.cross_entropy(self.logits, labels) if main is None else main
        for aux in self.aux:
            total = total + self.aux_weight * F.cross_entropy(aux, labels)
        return total


def training_outputs(output) -> TrainingOutputs:
    """The main logits and auxiliary logits of whatever a training forward returned (BadInput otherwise)."""
    if isinstance(output, torch.Tensor):
        return TrainingOutputs(output)
    weight = AUX_WEIGHTS.get(type(output).__name__, DEFAULT_AUX_WEIGHT)
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        # a namedtuple or an object: every other tensor field of the batch's shape is an auxiliary classifier
        others = [getattr(output, k) for k in _fields(output) if k != "logits"]
        return TrainingOutputs(logits, [t for t in others if _like(t, logits)], weight)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return TrainingOutputs(output[0], [t for t in output[1:] if _like(t, output[0])], weight)
    raise BadInput(
        f"the model's training forward returns {type(output).__name__}; ftwt trains on logits: a tensor, a tuple whose "
        "first item is the logits, or an object with a .logits tensor"
    )


def _fields(output) -> list[str]:
    if hasattr(output, "_fields"):  # a namedtuple
        return list(output._fields)
    return [k for k in vars(output) if not k.startswith("_")] if hasattr(output, "__dict__") else []


def _like(t, logits: torch.Tensor) -> bool:
    return isinstance(t, torch.Tensor) and t.shape == logits.shape
