"""Pretrained starts: torchvision's weights come from torch hub's cache ($TORCH_HOME) and load through
the same path as any checkpoint. A locally saved state_dict stands in for the download."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ftwt_cli.errors import BadInput
from ftwt_cli.io import loading
from ftwt_cli.io.config import resolve
from ftwt_cli.models import create_model

MODEL = "mobilenet_v2"  # the smallest of the three torchvision models


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory) -> Path:
    """An image folder with ImageNet's 1,000 classes (one tiny image each, in train/ and val/)."""
    root = tmp_path_factory.mktemp("imagenet")
    image = Image.new("RGB", (16, 16), (120, 60, 30))
    for split in ("train", "val"):
        for c in range(1000):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            image.save(folder / "0.png")
    return root


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """TORCH_HOME with torchvision's mobilenet_v2 file in place: a state_dict of known weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(loading.torchvision_weights_url(MODEL)).name
    path.parent.mkdir(parents=True)
    torch.manual_seed(3)
    torch.save(create_model(MODEL, 1000).state_dict(), path)
    return path


def test_profile_pretrained_loads_the_cached_torchvision_file(imagenet_like, torch_home):
    cfg = resolve("mobilenetv2-imagenet", data=f"imagefolder:{imagenet_like}")
    assert cfg.pretrained and loading.initial_weights(cfg, None) == loading.TORCHVISION
    loaded = loading.load_model(cfg, None)  # pretrained = true and no checkpoint: torchvision's weights
    assert loaded.path == str(torch_home) and loaded.kind == "dense"
    expected = torch.load(torch_home, weights_only=True)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in expected.items())


def test_a_broken_download_fails_like_any_checkpoint(imagenet_like, torch_home):
    """Same loading path: a truncated cached file is reported exactly as a truncated --checkpoint."""
    data = torch_home.read_bytes()
    torch_home.write_bytes(data[: len(data) // 3])
    cfg = resolve("mobilenetv2-imagenet", data=f"imagefolder:{imagenet_like}")
    with pytest.raises(BadInput, match="cannot read checkpoint .* truncated"):
        loading.load_model(cfg, "torchvision")


def test_missing_file_and_no_network_is_one_line(imagenet_like, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-home"))

    def offline(url, dst, progress=True):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cfg = resolve("mobilenetv2-imagenet", data=f"imagefolder:{imagenet_like}")
    with pytest.raises(BadInput, match="cannot download torchvision's mobilenet_v2 weights .* put the file at"):
        loading.load_model(cfg, None)


def test_pretrained_weights_need_1000_classes(torch_home, tmp_path):
    for name in ("a", "b"):
        for split in ("train", "val"):
            (tmp_path / "two" / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "two" / split / name / "0.png")
    cfg = resolve("mobilenetv2-imagenet", data=f"imagefolder:{tmp_path / 'two'}")
    with pytest.raises(BadInput, match="has 1000 classes .* needs 2"):
        loading.load_model(cfg, None)


def test_train_init_torchvision_through_the_cli(imagenet_like, torch_home, tmp_path, monkeypatch):
    """`ftwt train --init torchvision`: FTWT starts from the cached torchvision weights (one tiny epoch)."""
    import ftwt_cli.cli.train  # noqa: F401 - registers the command
    from ftwt_cli.cli import app

    monkeypatch.chdir(tmp_path)
    profile = tmp_path / "tiny-imagenet.toml"  # a profile file of one's own: caps the test split too
    profile.write_text(f'model = "{MODEL}"\ndata = "imagefolder:{imagenet_like}"\ntest_samples = 2\nbatch_size = 2\n')
    args = ["train", "--profile", str(profile), "--init", "torchvision", "--r", "0.9", "--epochs", "1"]
    result = CliRunner().invoke(app, [*args, "--samples", "2", "--device", "cpu", "--out", "run", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["init"] == "torchvision"
    assert json.loads(result.stdout)["mode"] == "decoupled"
