"""The embedded synthetic set, transforms, ImageFolder trees, and the shipped quickstart checkpoint."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from ftwt_cli.errors import BadInput
from ftwt_cli.io.config import PROFILE_DIR, resolve
from ftwt_cli.io.data import (
    CIFAR10_STATS,
    SyntheticImages,
    build_dataset,
    make_loader,
    num_classes_of,
    parse_data,
    subset,
)

SYNTHETIC = parse_data("synthetic")
QUICKSTART_CHECKPOINT = PROFILE_DIR / "checkpoints" / "quickstart-dense.pt"


def test_synthetic_is_deterministic_from_the_seed():
    a, b = SyntheticImages("train", seed=3), SyntheticImages("train", seed=3)
    for i in (0, 7, 4999):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    other_seed, test_split = SyntheticImages("train", seed=4), SyntheticImages("test", seed=3)
    assert not torch.equal(a[7][0], other_seed[7][0])
    assert not torch.equal(a[7][0], test_split[7][0])
    image, _ = a[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)


def test_synthetic_has_ten_balanced_classes():
    train, test = SyntheticImages("train"), SyntheticImages("test")
    assert (len(train), len(test)) == (5000, 1000)
    assert SyntheticImages.num_classes == num_classes_of(SYNTHETIC) == 10
    counts = Counter(train[i][1] for i in range(300))
    assert sorted(counts) == list(range(10)) and set(counts.values()) == {30}
    # the classes differ in content, not only in label: per-class mean colours are distinct
    means = torch.stack([torch.stack([train[c + 10 * k][0].float().mean(dim=(1, 2)) for k in range(10)]).mean(0) for c in range(10)])
    warm, cool = means[:5], means[5:]
    assert (warm[:, 0] > warm[:, 2]).all() and (cool[:, 2] > cool[:, 0]).all()


def test_transforms_normalise_augment_and_resize():
    plain = build_dataset(SYNTHETIC, "test", normalize=False)
    normalised = build_dataset(SYNTHETIC, "test")
    x01, label = plain[5]
    x, label2 = normalised[5]
    assert label == label2 and x.dtype == torch.float32 and x.shape == (3, 32, 32)
    assert 0.0 <= float(x01.min()) and float(x01.max()) <= 1.0
    mean, std = (torch.tensor(v)[:, None, None] for v in CIFAR10_STATS)
    torch.testing.assert_close(x, (x01 - mean) / std)

    augmented = build_dataset(SYNTHETIC, "train", augment=True)
    torch.manual_seed(0)
    views = [augmented[1][0] for _ in range(6)]
    assert all(v.shape == (3, 32, 32) for v in views)
    assert any(not torch.equal(views[0], v) for v in views[1:])  # random crop / flip actually applied

    imagenet = build_dataset(SYNTHETIC, "test", family="imagenet")
    assert imagenet[0][0].shape == (3, 224, 224)


def test_subset_and_loader_are_deterministic():
    ds = SyntheticImages("test")
    a, b = subset(ds, 50, seed=1), subset(ds, 50, seed=1)
    assert len(a) == 50 and a.indices == b.indices
    assert subset(ds, 50, seed=2).indices != a.indices
    assert subset(ds, 0) is ds and subset(ds, 10**6) is ds
    loader = make_loader(build_dataset(SYNTHETIC, "test"), 16)
    images, labels = next(iter(loader))
    assert len(loader) == 63 and images.shape == (16, 3, 32, 32) and labels.tolist() == [i % 10 for i in range(16)]


def write_image_folder(root: Path, splits=("train", "test"), classes=("cat", "dog"), per_class=2) -> None:
    for split in splits:
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (32, 32), (40 * c, 10 * i, 200)).save(folder / f"{i}.png")


def test_imagefolder_layout(tmp_path):
    write_image_folder(tmp_path / "ok", splits=("train", "val"))
    spec = parse_data(f"imagefolder:{tmp_path / 'ok'}")
    train = build_dataset(spec, "train")
    test = build_dataset(spec, "test")  # val/ stands in for test/
    assert len(train) == len(test) == 4 and num_classes_of(spec) == 2
    x, y = train[3]
    assert x.shape == (3, 32, 32) and y == 1


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "not found"),
        ("empty", "no train/"),
        ("no_images", "no class subfolders"),
    ],
)
def test_bad_imagefolders_are_bad_input(tmp_path, layout, message):
    root = tmp_path / layout
    if layout == "empty":
        root.mkdir()
    elif layout == "no_images":
        (root / "train" / "cat").mkdir(parents=True)
    with pytest.raises(BadInput, match=message):
        build_dataset(parse_data(f"imagefolder:{root}"), "train")


@pytest.mark.parametrize("spec", ["mnist", "imagefolder:", "cifar-10"])
def test_unknown_dataset_is_bad_input(spec):
    with pytest.raises(BadInput, match="unknown dataset"):
        parse_data(spec)


@pytest.mark.skipif(not QUICKSTART_CHECKPOINT.is_file(), reason=f"{QUICKSTART_CHECKPOINT} not trained yet")
def test_quickstart_checkpoint_scores_over_90_percent_on_synthetic_test():
    from ftwt_cli.io import loading

    cfg = resolve("quickstart")
    assert Path(cfg.checkpoint) == QUICKSTART_CHECKPOINT.resolve()
    assert QUICKSTART_CHECKPOINT.stat().st_size < 1_000_000
    loaded = loading.load_model(cfg, cfg.checkpoint, require="dense")
    model = loaded.model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in make_loader(loading.dataset(cfg, "test"), 250):
            correct += int((model(images).argmax(dim=1) == labels).sum())
            total += len(labels)
    assert total == 1000
    assert correct / total > 0.90
