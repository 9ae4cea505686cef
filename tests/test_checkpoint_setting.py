"""A checkpoint carries its setting: commands that read one use its data and input size unless told
otherwise, say so in one line, and refuse options that contradict it (issue #26, no silent wrong answers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

SMOKE = ("--profile", "smoke")


def _image_folder(root: Path, classes: int, prefix: str = "class") -> Path:
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"{prefix}{c}"
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (32, 32), (60 * c, 20 * i, 120)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A dense smallnet trained one epoch on a 3-class image folder, and the folders."""
    from typer.testing import CliRunner

    from ftwt_cli.cli import app

    root = tmp_path_factory.mktemp("setting")
    three = _image_folder(root / "three", 3)
    two = _image_folder(root / "two", 2)
    renamed = _image_folder(root / "renamed", 3, prefix="kind")
    args = ["train", *SMOKE, "--dense", "--data", f"imagefolder:{three}", "--out", str(root / "run")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr[-2000:]
    return {"ckpt": root / "run" / "best.pt", "three": three, "two": two, "renamed": renamed, "root": root}


def test_eval_without_data_uses_the_checkpoints_data_and_says_so(run_cli, trained):
    result = run_cli("eval", *SMOKE, "--checkpoint", trained["ckpt"], "--json")
    assert result.exit_code == 0, result.stderr
    assert f"data: imagefolder:{trained['three']}" in result.stderr and "(from the checkpoint)" in result.stderr
    doc = json.loads(result.stdout)
    assert doc["data"] == f"imagefolder:{trained['three']}"
    assert doc["models"][0]["samples"] == 12  # the folder's 3 × 4 test images, not the synthetic set's


def test_estimate_and_calibrate_follow_the_checkpoint_too(run_cli, trained):
    result = run_cli("estimate", *SMOKE, "--checkpoint", trained["ckpt"], "--json")
    assert result.exit_code == 0, result.stderr
    assert "(from the checkpoint)" in result.stderr
    assert '"samples": 12' in result.stdout  # 3 × 4 training images


@pytest.mark.parametrize(
    "args, words",
    [
        (("--data", "imagefolder:{two}"), ("does not have the 3 classes", "drop --data")),
        (("--image-size", "64"), ("32×32 inputs", "--image-size 64 contradicts")),
        (("--data", "imagefolder:{renamed}"), ("names its classes otherwise", "'kind0', not 'class0'")),
    ],
)
def test_options_that_contradict_the_checkpoint_are_refused(run_cli, trained, args, words):
    args = [a.format(**trained) for a in args]
    result = run_cli("eval", *SMOKE, "--checkpoint", trained["ckpt"], *args)
    assert result.exit_code == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 2  # config line + error
    for word in words:
        assert word in result.stderr


def test_compare_of_checkpoints_of_other_data_is_refused(run_cli, trained):
    quickstart = Path(__file__).resolve().parents[1] / "profiles" / "checkpoints" / "quickstart-dense.pt"
    result = run_cli("eval", *SMOKE, "--checkpoint", trained["ckpt"], "--compare", quickstart)
    assert result.exit_code == 2
    assert "was trained on synthetic" in result.stderr and "one data set" in result.stderr


def test_the_profiles_checkpoint_is_used_only_with_its_own_data(run_cli, trained):
    # quickstart's shipped dense model was trained on the synthetic set; another data set is refused
    # with the command that trains a dense model on it, for estimate as for FTWT training without --init
    folder = f"imagefolder:{trained['three']}"
    for command in (("estimate",), ("train", "--out", trained["root"] / "never")):
        result = run_cli(*command, "--data", folder)
        assert result.exit_code == 2, result.stderr
        assert "was trained on synthetic" in result.stderr and f"ftwt train --dense --model smallnet --data {folder}" in result.stderr
    assert not (trained["root"] / "never").exists()


def test_ftwt_training_from_the_checkpoint_trains_on_its_data(run_cli, trained):
    out = trained["root"] / "ftwt"
    result = run_cli("train", *SMOKE, "--init", trained["ckpt"], "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert "(from the checkpoint)" in result.stderr
    assert json.loads((out / "config.json").read_text())["config"]["data"] == f"imagefolder:{trained['three']}"


def test_a_moved_data_folder_is_named_with_the_way_out(run_cli, trained, tmp_path):
    moved = tmp_path / "moved"
    trained["three"].rename(moved)
    try:
        result = run_cli("eval", *SMOKE, "--checkpoint", trained["ckpt"])
        assert result.exit_code == 2 and "which is not there; pass --data" in result.stderr
        given = run_cli("eval", *SMOKE, "--checkpoint", trained["ckpt"], "--data", f"imagefolder:{moved}")
        assert given.exit_code == 0, given.stderr
        assert f"given; best.pt was trained on imagefolder:{trained['three']}" in given.stderr
    finally:
        moved.rename(trained["three"])


def test_inputs_are_normalised_as_the_checkpoint_was(trained, tmp_path):
    import torch

    from ftwt_cli.io import loading, setting
    from ftwt_cli.io.checkpoint import load_checkpoint, save_checkpoint
    from ftwt_cli.io.config import resolve
    from ftwt_cli.models import create_model

    meta = load_checkpoint(trained["ckpt"])["meta"]
    custom = tmp_path / "custom.pt"
    save_checkpoint(custom, create_model("smallnet", 3), {**meta, "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}})
    cfg = setting.follow(resolve("smoke", checkpoint=str(custom)), str(custom))
    assert loading.normalization(cfg) == ((0.5,) * 3, (0.25,) * 3)
    raw = loading.dataset(cfg, "test", normalize=False)[0][0]
    assert torch.allclose(loading.dataset(cfg, "test")[0][0], (raw - 0.5) / 0.25, atol=1e-6)
    assert loading.dense_meta(cfg, 3)["normalization"] == {"mean": [0.5] * 3, "std": [0.25] * 3}  # runs from it keep it
