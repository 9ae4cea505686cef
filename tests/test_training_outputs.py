"""Models whose training forward returns more than logits (GoogLeNet, Inception v3 with auxiliary heads,
a tuple or a namedtuple) train on their main logits plus weighted auxiliary losses (issue #26)."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F

from ftwt_cli.algorithms.outputs import AUX_WEIGHTS, DEFAULT_AUX_WEIGHT, training_outputs
from ftwt_cli.errors import BadInput

Out = namedtuple("Out", "logits aux")

AUX_MODEL = '''
from collections import namedtuple
from torch import nn

Out = namedtuple("Out", "logits aux")


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, num_classes)
        self.aux = nn.Linear(8, num_classes)

    def forward(self, x):
        features = self.body(x)
        logits = self.fc(features)
        return Out(logits, self.aux(features)) if self.training else logits


def build(num_classes=10):
    return Net(num_classes)
'''


def test_a_tensor_is_its_own_logits():
    logits = torch.randn(4, 3)
    outputs = training_outputs(logits)
    assert outputs.logits is logits and outputs.aux == []


def test_auxiliary_losses_are_added_at_their_weight():
    torch.manual_seed(0)
    logits, aux, labels = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    for output in (Out(logits, aux), (logits, aux)):
        outputs = training_outputs(output)
        assert outputs.logits is logits
        expected = F.cross_entropy(logits, labels) + DEFAULT_AUX_WEIGHT * F.cross_entropy(aux, labels)
        assert torch.allclose(outputs.loss(labels), expected)


def test_torchvision_outputs_use_their_recipes_weights():
    from torchvision.models import GoogLeNetOutputs, InceptionOutputs

    logits = torch.randn(2, 5)
    google = training_outputs(GoogLeNetOutputs(logits, torch.randn(2, 5), torch.randn(2, 5)))
    inception = training_outputs(InceptionOutputs(logits, torch.randn(2, 5)))
    assert (len(google.aux), google.aux_weight) == (2, AUX_WEIGHTS["GoogLeNetOutputs"]) == (2, 0.3)
    assert (len(inception.aux), inception.aux_weight) == (1, 0.4)
    assert training_outputs(InceptionOutputs(logits, None)).aux == []  # aux_logits=False


def test_an_output_without_logits_is_refused():
    with pytest.raises(BadInput, match="trains on logits"):
        training_outputs({"scores": torch.randn(2, 3)})


def test_googlenet_with_aux_heads_takes_a_training_step():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.googlenet(num_classes=10, aux_logits=True, init_weights=False).train()
    outputs = training_outputs(model(torch.randn(2, 3, 32, 32)))
    assert len(outputs.aux) == 2
    outputs.loss(torch.tensor([0, 1])).backward()
    assert model.aux1.fc2.weight.grad is not None and model.fc.weight.grad is not None


def test_a_model_with_aux_outputs_trains_dense_and_ftwt(run_cli, tmp_path):
    (tmp_path / "auxnet.py").write_text(AUX_MODEL)
    model = f"{tmp_path / 'auxnet.py'}:build"
    dense = run_cli("train", "--profile", "smoke", "--model", model, "--dense", "--out", tmp_path / "dense")
    assert dense.exit_code == 0, dense.stderr
    ftwt = run_cli("train", "--profile", "smoke", "--model", model, "--init", tmp_path / "dense" / "best.pt", "--out", tmp_path / "ftwt")
    assert ftwt.exit_code == 0, ftwt.stderr
    assert (tmp_path / "ftwt" / "best.pt").is_file()
