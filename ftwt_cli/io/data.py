"""Data sets and loaders: the embedded synthetic set, CIFAR-10/100 and ImageFolder trees.

Every dataset yields ``(image, label)`` with image a float tensor; ``normalize=False`` keeps pixels in
[0, 1] so that perturbations (blur, noise) can be applied before normalisation (see ftwt_cli.algorithms.perturb).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets
from torchvision.transforms import v2

from ftwt_cli.errors import BadInput

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
LAYOUT = "imagefolder:PATH needs PATH/train/CLASS/IMAGE and PATH/test/CLASS/IMAGE (or val/)"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass(frozen=True)
class DataSpec:
    kind: str  # synthetic | cifar10 | cifar100 | imagefolder
    path: Path | None = None

    @property
    def name(self) -> str:
        return f"imagefolder:{self.path}" if self.kind == "imagefolder" else self.kind


def parse_data(spec: str) -> DataSpec:
    if spec in ("synthetic", "cifar10", "cifar100"):
        return DataSpec(spec)
    if spec.startswith("imagefolder:") and len(spec) > len("imagefolder:"):
        return DataSpec("imagefolder", Path(spec.split(":", 1)[1]).expanduser())
    raise BadInput(f"unknown dataset {spec!r}; use synthetic, cifar10, cifar100 or imagefolder:PATH")


# ---------------------------------------------------------------------------------------------------
# The synthetic set: 10 classes = 5 textures × 2 palettes. Textures are chosen so that horizontal
# flips and small shifts (the CIFAR augmentation) never change the class.

SYNTHETIC_SIZES = {"train": 5000, "test": 1000}
_TEXTURES = ("horizontal-stripes", "vertical-stripes", "checks", "rings", "blob")
_PALETTE_NAMES = ("warm", "cool")
_PALETTES = (
    ((0.85, 0.35, 0.15), (0.95, 0.75, 0.25)),  # warm: foreground hues around red/orange/yellow
    ((0.15, 0.35, 0.85), (0.25, 0.80, 0.75)),  # cool: blue/teal
)


class SyntheticImages(Dataset):
    """Procedural, class-structured 32×32 RGB images, a pure function of (seed, split, index)."""

    num_classes = 10

    def __init__(self, split: str, seed: int = 0, size: int | None = None, transform=None) -> None:
        self.split = split
        self.seed = seed
        self.size = size if size is not None else SYNTHETIC_SIZES[split]
        self.transform = transform
        coords = torch.linspace(-1.0, 1.0, 32)
        self._y, self._x = torch.meshgrid(coords, coords, indexing="ij")

    def __len__(self) -> int:
        return self.size

    def image(self, index: int) -> tuple[torch.Tensor, int]:
        label = index % self.num_classes
        split_salt = 0 if self.split == "train" else 1
        g = torch.Generator().manual_seed((self.seed * 2 + split_salt) * 1_000_003 + index)
        u = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()  # noqa: E731
        texture, palette = label % 5, label // 5
        freq, phase = u(1.5, 4.0), u(0, 2 * math.pi)
        x, y = self._x + u(-0.3, 0.3), self._y + u(-0.3, 0.3)
        if texture == 0:
            pattern = torch.sin(math.pi * freq * y + phase)
        elif texture == 1:
            pattern = torch.sin(math.pi * freq * x + phase)
        elif texture == 2:
            pattern = torch.sin(math.pi * freq * x) * torch.sin(math.pi * freq * y + phase)
        elif texture == 3:
            pattern = torch.sin(math.pi * freq * 1.5 * torch.sqrt(x**2 + y**2) + phase)
        else:
            radius = u(0.25, 0.6)
            pattern = 2 * torch.exp(-(x**2 + y**2) / (2 * radius**2)) - 1
        lo, hi = _PALETTES[palette]
        mix = u(0, 1)
        fg = torch.tensor([a + (b - a) * mix for a, b in zip(lo, hi)]) * u(0.7, 1.0)
        bg = torch.rand(3, generator=g) * 0.35
        img = bg[:, None, None] + (pattern[None] * 0.5 + 0.5) * (fg - bg)[:, None, None]
        img = img + 0.06 * torch.randn(3, 32, 32, generator=g)
        return (img.clamp(0, 1) * 255).round().to(torch.uint8), label

    def __getitem__(self, index: int):
        img, label = self.image(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, label


# ---------------------------------------------------------------------------------------------------


def stats_for(spec: DataSpec, family: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if spec.kind == "cifar100":
        return CIFAR100_STATS
    return IMAGENET_STATS if family == "imagenet" else CIFAR10_STATS


def build_transform(
    spec: DataSpec, family: str, augment: bool, normalize: bool = True, size: int = 224, stats: tuple | None = None
) -> v2.Compose:
    """Standard CIFAR (crop 4 + flip) or ImageNet (random-resized crop + flip; resize 256, crop 224), the
    ImageNet family at ``size`` (resize to 256/224 of it, centre crop); normalised with ``stats`` (mean, std)
    when given, else the data's own."""
    steps: list = [v2.ToImage()]
    if family == "imagenet":
        steps += [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()] if augment else [
            v2.Resize(round(size * 256 / 224), antialias=True),
            v2.CenterCrop(size),
        ]
    elif augment:
        steps += [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if normalize:
        mean, std = stats if stats is not None else stats_for(spec, family)
        steps.append(v2.Normalize(mean, std))
    return v2.Compose(steps)


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def class_names_of(spec: DataSpec, root: str | Path = "data") -> list[str] | None:
    """The label names in label order (None where they cannot be read: CIFAR-100 not on disk)."""
    if spec.kind == "synthetic":
        return [f"{_TEXTURES[label % 5]}-{_PALETTE_NAMES[label // 5]}" for label in range(SyntheticImages.num_classes)]
    if spec.kind == "cifar10":
        return list(CIFAR10_CLASSES)
    if spec.kind == "imagefolder":
        return _imagefolder_classes(_split_dir(spec, "train"))
    try:
        return list(datasets.CIFAR100(str(root), train=False, download=False).classes)
    except (RuntimeError, OSError):
        return None


def num_classes_of(spec: DataSpec, root: str | Path = "data") -> int:
    if spec.kind == "cifar100":
        return 100
    if spec.kind == "imagefolder":
        return len(_imagefolder_classes(_split_dir(spec, "train")))
    return 10


def build_dataset(
    spec: DataSpec,
    split: str,
    *,
    family: str = "cifar",
    augment: bool = False,
    normalize: bool = True,
    root: str | Path = "data",
    download: bool = False,
    seed: int = 0,
    size: int = 224,
    stats: tuple | None = None,
) -> Dataset:
    """The ``train`` or ``test`` split of ``spec`` with the standard transforms of the model family (the
    ImageNet family at ``size`` pixels)."""
    transform = build_transform(spec, family, augment, normalize, size, stats)
    if spec.kind == "synthetic":
        return SyntheticImages(split, seed=seed, transform=transform)
    if spec.kind in ("cifar10", "cifar100"):
        cls = datasets.CIFAR10 if spec.kind == "cifar10" else datasets.CIFAR100
        try:
            return cls(str(root), train=split == "train", transform=transform, download=download)
        except RuntimeError as exc:
            hint = "" if download else "; pass --download to fetch it"
            raise BadInput(f"{spec.kind} not found under {root} ({exc}){hint}") from None
    folder = _split_dir(spec, split)
    if split != "train":  # labels are class-folder indices: both splits need the same class folders
        train_classes, classes = _imagefolder_classes(_split_dir(spec, "train")), _imagefolder_classes(folder)
        if classes != train_classes:
            extra = sorted(set(classes) ^ set(train_classes))
            raise BadInput(
                f"{folder} and {spec.path / 'train'} have different class folders (e.g. {extra[0]!r}); "
                "give both the same class subfolders"
            )
    try:
        dataset = datasets.ImageFolder(
            str(folder), transform=transform, loader=_decode_image, is_valid_file=_is_image_file
        )
    except FileNotFoundError as exc:  # a class folder without images
        raise BadInput(f"{folder}: {exc} (every class subfolder needs images, or remove it)") from None
    if len(dataset) == 0:
        raise BadInput(f"no images in {folder} (expected {folder}/CLASS/IMAGE.png)")
    return dataset


def _split_dir(spec: DataSpec, split: str) -> Path:
    root = spec.path
    if root is None or not root.is_dir():
        raise BadInput(f"data folder not found: {root} ({LAYOUT})")
    names = ["train"] if split == "train" else ["test", "val"]
    for name in names:
        if (root / name).is_dir():
            if not _imagefolder_classes(root / name):
                raise BadInput(f"data folder {root / name} has no class subfolders with images ({LAYOUT})")
            return root / name
    raise BadInput(f"data folder {root} has no {' or '.join(n + '/' for n in names)} subfolder ({LAYOUT})")


def _is_image_file(path: str) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _imagefolder_classes(folder: Path) -> list[str]:
    try:
        return sorted(
            d.name
            for d in folder.iterdir()
            if d.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.iterdir())
        )
    except PermissionError as exc:
        raise BadInput(f"cannot read data folder {exc.filename}: permission denied") from None


def _decode_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise BadInput(f"cannot decode image {path}: not an image file PIL can read (remove or replace the file)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:150]
        raise BadInput(f"cannot decode image {path}: {detail} (remove or replace the file)") from None


def subset(dataset: Dataset, samples: int | None, seed: int = 0) -> Dataset:
    """A deterministic random subset of ``samples`` items (all of them when samples is None/0)."""
    if not samples or samples >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:samples]
    return Subset(dataset, sorted(order.tolist()))


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    workers: int = 0,
    seed: int = 0,
    sampler=None,
    drop_last: bool = False,
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle and sampler is None else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        generator=generator,
        drop_last=drop_last,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
