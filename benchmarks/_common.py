"""Shared by the benchmark scripts: where the development images are."""

import os
from pathlib import Path

#: Real CIFAR-10 images for development (ImageFolder layout), kept beside the repository, never in it.
CIFAR10_MINI = os.environ.get(
    "FTWT_CIFAR10_MINI", str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-mini")
)
