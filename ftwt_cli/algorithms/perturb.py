"""Input perturbations of the paper's Table 3 (Gaussian blur and additive noise on [0, 1] pixels) and the
normalisation applied after them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torchvision.transforms.v2 import functional as TF

#: The paper's Table 3 grids (σ on [0, 1] pixels).
BLUR_SIGMAS = (0.5, 0.7, 0.9, 1.09, 1.27, 1.45)
NOISE_SIGMAS = (0.0, 0.02, 0.05, 0.11, 0.14, 0.20)
PERTURBATION_KINDS = ("clean", "blur", "noise")


# ---------------------------------------------------------------------------------------------------
# Perturbations


def blur_kernel_size(sigma: float) -> int:
    """Odd kernel covering ±3σ (at least 3 wide), where the Gaussian has lost all but 0.3 % of its mass."""
    return 2 * max(1, math.ceil(3 * sigma)) + 1


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma == 0:
        return images
    size = blur_kernel_size(sigma)
    return TF.gaussian_blur(images, [size, size], [sigma, sigma])


def gaussian_noise(images: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """images + σ·N(0, 1), clipped back to [0, 1]; drawn on the CPU so every device sees the same noise."""
    if sigma == 0:
        return images
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
    return (images + sigma * noise.to(images.device)).clamp_(0.0, 1.0)


def noise_generator(seed: int, batch_index: int) -> torch.Generator:
    """The noise of a batch depends only on (seed, batch index): reproducible and the same for all models."""
    return torch.Generator().manual_seed(seed * 1_000_003 + batch_index)


@dataclass(frozen=True)
class Perturbation:
    kind: str  # one of PERTURBATION_KINDS
    sigma: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in PERTURBATION_KINDS:
            raise ValueError(f"unknown perturbation {self.kind!r}")
        if not self.sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")

    @property
    def is_identity(self) -> bool:
        return self.kind == "clean" or self.sigma == 0

    @property
    def label(self) -> str:
        return "clean" if self.kind == "clean" else f"{self.kind} σ={self.sigma:g}"

    def apply(self, images: torch.Tensor, seed: int, batch_index: int) -> torch.Tensor:
        """Perturb a batch of [0, 1] images."""
        if self.is_identity:
            return images
        if self.kind == "blur":
            return gaussian_blur(images, self.sigma)
        return gaussian_noise(images, self.sigma, noise_generator(seed, batch_index))


def perturbation_grid(blur_sigmas: Sequence[float], noise_sigmas: Sequence[float]) -> list[Perturbation]:
    return [Perturbation("blur", s) for s in blur_sigmas] + [Perturbation("noise", s) for s in noise_sigmas]


@dataclass
class Normalizer:
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return TF.normalize(images, list(self.mean), list(self.std))
