"""Every user-facing input, wrong, through the real CLI: exit 2, one ``error:`` line naming the problem
and the way out, no traceback, nothing on stdout, and no file written or changed anywhere."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ftwt_cli.io import loading
from ftwt_cli.io.checkpoint import save_checkpoint
from ftwt_cli.io.config import resolve
from ftwt_cli.models import create_model

USER_MODEL = """
import torch
from torch import nn

def build(num_classes=10):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )

def not_a_module(num_classes=10):
    return "a string"

def needs_more(num_classes, width):
    return None

def fails(num_classes=10):
    raise RuntimeError("width must be even")
"""


def _png(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """One folder holding every bad (and one good) input file the table refers to as {name}."""
    root = tmp_path_factory.mktemp("inputs")
    cfg = resolve("smoke")
    torch.manual_seed(0)
    smallnet = create_model("smallnet", 10)
    save_checkpoint(root / "dense.pt", smallnet, loading.dense_meta(cfg, 10))
    save_checkpoint(root / "resnet20.pt", create_model("resnet20", 10), loading.dense_meta(resolve("smoke", model="resnet20"), 10))
    save_checkpoint(root / "dense100.pt", create_model("smallnet", 100), {**loading.dense_meta(cfg, 100), "data": "cifar100"})
    torch.save(create_model("resnet20", 10).state_dict(), root / "resnet20_state.pt")
    torch.save(create_model("smallnet", 100).state_dict(), root / "smallnet100_state.pt")
    torch.save(create_model("smallnet", 2).state_dict(), root / "smallnet2_state.pt")
    data = (root / "dense.pt").read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    (root / "text.pt").write_text("hello, I am not a checkpoint\n")
    (root / "empty.pt").write_bytes(b"")
    torch.save(smallnet, root / "pickled_model.pt")  # a whole module: needs unpickling code
    with open(root / "plain.pkl", "wb") as f:
        pickle.dump({"weights": [1, 2, 3]}, f)
    torch.save({"epoch": 3, "note": "no tensors"}, root / "no_tensors.pt")
    (root / "net.py").write_text(USER_MODEL)
    (root / "broken.py").write_text("import torch\ndef build(num_classes=10):\n    return torch.nn.Sequential(\n")
    (root / "raises.py").write_text("raise ImportError('needs the timm package')\n")
    (root / "weights.bin").write_bytes(bytes(range(256)) * 4)  # given as a model file: not Python source
    (root / "a_file").write_text("x")
    (root / "a_folder").mkdir()
    (root / "bad_key.toml").write_text('model = "smallnet"\nbatchsize = 64\n')
    (root / "bad_type.toml").write_text('model = "smallnet"\nbatch_size = "large"\n')
    (root / "bad_list.toml").write_text('[dense]\nmilestones = "80,120"\n')
    (root / "not_toml.toml").write_text("model = smallnet\n")
    # image folders
    (root / "no_classes" / "train").mkdir(parents=True)
    (root / "no_classes" / "test").mkdir(parents=True)
    (root / "no_split").mkdir()
    _png(root / "no_split" / "cat" / "0.png")
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (root / "corrupt" / split / name).mkdir(parents=True)
            (root / "corrupt" / split / name / "0.png").write_bytes(b"\x89PNG but not really")
    for split, classes in (("train", ("cat", "dog")), ("test", ("cat", "fox"))):
        for name in classes:
            _png(root / "mismatch" / split / name / "0.png")
    (root / "busy_run").mkdir()
    (root / "busy_run" / "config.json").write_text("{}")
    return root


# (command, arguments, words the one error line must contain). {name} is a path in the inputs folder.
SMOKE = ("--profile", "smoke")
CASES = [
    # options
    ("estimate", (*SMOKE, "--workers", "-1"), ("--workers", "0")),
    ("estimate", (*SMOKE, "--batch-size", "0"), ("--batch-size", "at least 1")),
    ("estimate", (*SMOKE, "--samples", "-5"), ("--samples",)),
    ("estimate", (*SMOKE, "--target-flops", "0"), ("--target-flops", "(0, 100)")),
    ("estimate", (*SMOKE, "--target-flops", "100"), ("--target-flops", "(0, 100)")),
    ("estimate", (*SMOKE, "--target-flops", "150"), ("--target-flops", "(0, 100)")),
    ("search", (*SMOKE, "--target-flops", "-3"), ("--target-flops",)),
    ("search", (*SMOKE,), ("--target-flops is required",)),
    ("search", (*SMOKE, "--target-flops", "50", "--tolerance", "0"), ("--tolerance",)),
    ("estimate", (*SMOKE, "--ratios", "1.5"), ("r must be in (0, 1]",)),
    ("estimate", (*SMOKE, "--ratios", "0"), ("r must be in (0, 1]",)),
    ("estimate", (*SMOKE, "--ratios", "high,low"), ("--ratios", "comma list")),
    ("estimate", (*SMOKE, "--ratios", "0.9:0.8:0.01"), ("--ratios", "start:stop:step")),
    ("estimate", (*SMOKE, "--ratios", "0:1:0.0000001"), ("--ratios", "larger step")),
    ("estimate", (*SMOKE, "--ratios", ","), ("--ratios is empty",)),
    ("estimate", (*SMOKE, "--device", "tpu"), ("--device", "auto, cpu")),
    ("estimate", (*SMOKE, "--device", "cuda:x"), ("--device", "cuda:N")),
    ("estimate", (*SMOKE, "--data", "mnist"), ("unknown dataset", "imagefolder:PATH")),
    ("estimate", (*SMOKE, "--data", "cifar10", "--data-root", "{a_folder}"), ("cifar10 not found", "--download")),
    ("train", (*SMOKE, "--dense", "--epochs", "0"), ("--epochs",)),
    ("train", (*SMOKE, "--dense", "--lr", "-0.1"), ("--lr",)),
    ("train", (*SMOKE, "--dense", "--milestones", "eighty"), ("--milestones",)),
    ("train", (*SMOKE, "--init", "{dense}", "--r", "0.9", "--mode", "together"), ("--mode", "decoupled or joint")),
    ("train", (*SMOKE, "--init", "{dense}", "--r", "1.2"), ("r must be in (0, 1]",)),
    ("train", (*SMOKE, "--init", "{dense}", "--r", "0.9", "--target-flops", "50"), ("either --r or --target-flops",)),
    ("train", (*SMOKE, "--init", "{dense}", "--freeze-heads-after", "2"), ("--freeze-heads-after",)),
    ("train", (*SMOKE, "--init", "{dense}", "--head-init", "zeros"), ("--head-init",)),
    ("train", (*SMOKE, "--dense", "--init", "{dense}"), ("--dense", "--init")),
    ("train", (*SMOKE, "--dense", "--val-fraction", "1.5"), ("--val-fraction", "[0, 1)")),
    ("train", (*SMOKE, "--dense", "--val-fraction", "-0.1"), ("--val-fraction",)),
    ("train", (*SMOKE, "--dense", "--val-fraction", "0.9999"), ("--val-fraction", "leaves no training images")),
    ("train", (*SMOKE,), ("needs --init", "ftwt train --dense --model smallnet")),
    ("train", (*SMOKE, "--init", "{dense}", "--target-flops", "40", "--codebook", "0"), ("--codebook", "at least 1")),
    ("train", (*SMOKE, "--init", "{dense}", "--r", "0.9", "--codebook", "2"), ("--codebook", "--target-flops")),
    ("train", (*SMOKE, "--init", "{dense}", "--r", "0.9", "--distill", "0"), ("--distill", "positive")),
    ("train", (*SMOKE, "--init", "{dense}", "--r", "0.9", "--distill", "4", "--distill-weight", "1.5"), ("--distill-weight",)),
    ("train", (*SMOKE, "--init", "{dense}", "--r", "0.9", "--gate", "some"), ("--gate", "all or internal")),
    ("train", (*SMOKE, "--dense", "--distill", "4"), ("--dense", "--distill")),
    ("train", (*SMOKE, "--init", "{dense}", "--static", "uniform", "--target-flops", "40", "--codebook", "2"), ("--static uniform", "--codebook")),
    ("eval", (*SMOKE,), ("--checkpoint is required",)),
    ("eval", ("--blur-sigmas", "-1"), ("--blur-sigmas",)),
    ("eval", ("--latency", "--threads", "0"), ("--threads",)),
    # profiles and profile keys
    ("estimate", ("--profile", "no-such-profile"), ("unknown profile", "quickstart")),
    ("estimate", ("--profile", "{a_folder}/missing.toml"), ("profile file not found",)),
    ("estimate", ("--profile", "{bad_key}"), ("unknown fields: batchsize", "batch_size")),
    ("estimate", ("--profile", "{bad_type}"), ("batch_size must be an integer",)),
    ("estimate", ("--profile", "{bad_list}"), ("dense_milestones must be a list of integers",)),
    ("estimate", ("--profile", "{not_toml}"), ("not valid TOML",)),
    # model specs
    ("estimate", (*SMOKE, "--model", "resnet99"), ("unknown model", "resnet56")),
    ("estimate", (*SMOKE, "--model", "{a_folder}/missing.py:build"), ("model file not found",)),
    ("estimate", (*SMOKE, "--model", "{weights}:build"), ("as Python source",)),
    ("estimate", (*SMOKE, "--model", "{broken}:build"), ("as Python source", "SyntaxError")),
    ("estimate", (*SMOKE, "--model", "{raises}:build"), ("timm",)),
    ("estimate", (*SMOKE, "--model", "{net}:nowhere"), ("no callable named 'nowhere'",)),
    ("estimate", (*SMOKE, "--model", "{net}:not_a_module"), ("not an nn.Module",)),
    ("estimate", (*SMOKE, "--model", "{net}:needs_more"), ("must accept num_classes",)),
    ("estimate", (*SMOKE, "--model", "{net}:fails"), ("width must be even",)),
    ("estimate", (*SMOKE, "--model", "no_such_package.nets:build"), ("could not import model module", "PYTHONPATH")),
    ("estimate", (*SMOKE, "--model", "{net}:"), ("model spec",)),
    # checkpoints
    ("estimate", (*SMOKE, "--checkpoint", "{resnet20}"), ("is for model 'resnet20'", "--model resnet20")),
    ("estimate", (*SMOKE, "--checkpoint", "{resnet20_state}"), ("does not fit smallnet", "another architecture")),
    ("estimate", (*SMOKE, "--checkpoint", "{smallnet100_state}"), ("100 classes", "needs 10", "--data")),
    ("estimate", (*SMOKE, "--checkpoint", "{dense100}"), ("cifar100 not found", "--download")),
    ("estimate", (*SMOKE, "--checkpoint", "{truncated}"), ("cannot read checkpoint", "truncated")),
    ("estimate", (*SMOKE, "--checkpoint", "{text}"), ("cannot read checkpoint", "not a PyTorch checkpoint")),
    ("estimate", (*SMOKE, "--checkpoint", "{empty}"), ("cannot read checkpoint", "empty")),
    ("estimate", (*SMOKE, "--checkpoint", "{pickled_model}"), ("Python objects", "state_dict()")),
    ("estimate", (*SMOKE, "--checkpoint", "{plain}"), ("cannot read checkpoint", "torch.save")),
    ("estimate", (*SMOKE, "--checkpoint", "{no_tensors}"), ("neither an ftwt checkpoint nor a state_dict",)),
    ("estimate", (*SMOKE, "--checkpoint", "{a_folder}/missing.pt"), ("checkpoint not found",)),
    ("estimate", (*SMOKE, "--checkpoint", "{a_folder}"), ("is a folder",)),
    ("estimate", (*SMOKE, "--checkpoint", "torchvision"), ("torchvision has pretrained weights for", "not 'smallnet'")),
    ("eval", (*SMOKE, "--checkpoint", "{resnet20_state}"), ("does not fit smallnet",)),
    ("eval", (*SMOKE, "--checkpoint", "{dense}", "--compare", "{truncated}"), ("truncated",)),
    ("train", (*SMOKE, "--init", "{resnet20}", "--r", "0.9"), ("is for model 'resnet20'",)),
    ("train", (*SMOKE, "--init", "{smallnet100_state}", "--r", "0.9"), ("100 classes",)),
    ("train", (*SMOKE, "--init", "{text}", "--r", "0.9"), ("not a PyTorch checkpoint",)),
    # image folders
    ("estimate", (*SMOKE, "--data", "imagefolder:{a_folder}/nothing"), ("data folder not found",)),
    ("estimate", (*SMOKE, "--data", "imagefolder:{no_classes}"), ("no class subfolders with images",)),
    ("estimate", (*SMOKE, "--data", "imagefolder:{no_split}"), ("no train/ subfolder",)),
    ("estimate", (*SMOKE, "--data", "imagefolder:{corrupt}"), ("cannot decode image", "remove or replace")),
    ("estimate", (*SMOKE, "--data", "imagefolder:{corrupt}", "--workers", "1"), ("cannot decode image",)),  # in a worker
    ("eval", (*SMOKE, "--checkpoint", "{smallnet2_state}", "--data", "imagefolder:{mismatch}"), ("different class folders",)),
    # outputs
    ("estimate", (*SMOKE, "--csv", "{a_file}/table.csv"), ("cannot write --csv", "is a file")),
    ("estimate", (*SMOKE, "--plot", "{a_folder}"), ("--plot", "is a folder")),
    ("eval", (*SMOKE, "--checkpoint", "{dense}", "--csv", "{a_file}"), ("--csv", "not a folder")),
    ("train", (*SMOKE, "--dense", "--out", "{a_file}/run"), ("cannot write --out", "is a file")),
    ("train", (*SMOKE, "--dense", "--out", "{busy_run}"), ("already exists", "--resume")),
    ("train", ("--resume", "{a_folder}"), ("not an ftwt run directory",)),
    ("train", ("--resume", "{busy_run}", "--lr", "0.1"), ("--resume continues", "--lr")),
]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def invoke():
    import ftwt_cli.cli.evaluate  # noqa: F401 - registers every command on the app
    import ftwt_cli.cli.plan  # noqa: F401
    import ftwt_cli.cli.train  # noqa: F401
    from ftwt_cli.cli import app

    runner = CliRunner()
    return lambda args: runner.invoke(app, args)


@pytest.mark.parametrize(("command", "args", "words"), CASES, ids=[" ".join((c, *a)) for c, a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(invoke, inputs, tmp_path, monkeypatch, command, args, words):
    if "cuda" in " ".join(args) and torch.cuda.is_available():
        pytest.skip("CUDA present")
    paths = {p.stem: str(p) for p in inputs.iterdir()}
    workdir = tmp_path / "cwd"  # default outputs (runs/) would land here
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # a pretrained download must not happen
    before = _snapshot(inputs)
    result = invoke([command, *(a.format(**paths) for a in args), "--json"])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    for word in words:
        assert word in errors[0], errors[0]
    assert _snapshot(inputs) == before, "an input was written or changed"
    assert not any(workdir.iterdir()) and not (tmp_path / "torch-home").exists()


def test_no_permission_to_write_is_bad_input(invoke, inputs, tmp_path, monkeypatch):
    """A read-only folder (as root, chmod does not stop writes, so the check is made to see one)."""
    monkeypatch.chdir(tmp_path)
    real_access = os.access
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    result = invoke(["train", "--profile", "smoke", "--dense", "--out", str(locked / "run"), "--json"])
    assert result.exit_code == 2 and "no permission to write in" in result.stderr and "Traceback" not in result.output
    assert not any(locked.iterdir())
