"""Shared fixtures: CLI runners (a typer Result, or a command's --json document) and a tiny conv net factory."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn
from typer.testing import CliRunner


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models run several times faster with one intra-op thread on a small, shared machine.
    ``FTWT_TEST_THREADS=N`` runs the session with N threads instead: another thread count sums in another
    order, so a test whose trained figure moves with it is bound to one machine's arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("FTWT_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture
def run_cli():
    """``run_cli(*args)`` → typer Result (stdout and stderr kept apart)."""
    import ftwt_cli.cli.plan  # noqa: F401 - registers profiles/estimate/search on the app
    from ftwt_cli.cli import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="session")
def cli_json():
    """``cli_json(*args)`` → the command's ``--json`` document; a non-zero exit fails with its stderr."""
    from ftwt_cli.cli import app

    runner = CliRunner()

    def invoke(*args):
        result = runner.invoke(app, [str(a) for a in args] + ["--json"])
        assert result.exit_code == 0, result.stderr[-2000:]
        return json.loads(result.stdout)

    return invoke


class TinyNet(nn.Module):
    """conv→BN→ReLU→MaxPool→conv→BN→ReLU→GAP→Linear: two gated blocks, the second fed by the first."""

    def __init__(self, num_classes: int = 2, channels: tuple[int, int] = (4, 6)) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu1(self.bn1(self.conv1(x))))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(self.gap(x).flatten(1))


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()
