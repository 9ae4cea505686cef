"""The trained models ``latency.py`` times, built through the real CLI and cached under ``--checkpoint-dir``.

Per model: a dense run (``ftwt train --dense``); an FTWT run from it (``--target-flops 52``) whose heads
first train on the frozen backbone (``--head-warmup``) and then train on, one epoch at a time
(``--resume``), until the head loss stops falling (or an epoch cap); ``ftwt calibrate`` of its best.pt
to each FLOPs level. The same again with ``--head-norm`` (the more dynamic head), whose masks are
reported beside the default head's. Static baselines (torch-pruning uniform, at a given reduction) are
cached as their pruning histories.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ftwt_cli.algorithms.static import plain_history, restore, uniform
from ftwt_cli.console import console
from ftwt_cli.models import create_model

ROOT = Path(__file__).resolve().parent.parent
#: Wall and CPU seconds the CLI runs of this process took (training and calibration).
SPENT = {"wall_s": 0.0, "cpu_s": 0.0}
TRAIN_TARGET = 52  # --target-flops of the FTWT runs
#: A head-loss fall below this fraction between epochs counts as having stopped.
PLATEAU = 0.03
#: The profile of every run: small batches, heads trained throughout, a small test pass (accuracy is
#: not what the latency benchmark measures), a fifth of the training images held out (calibration and
#: the engine's prototypes are fitted on them).
PROFILE = """description = "benchmarks/latency.py: short training runs whose heads give real masks"
batch_size = 32
test_samples = 32
workers = 0
val_fraction = 0.2
ratios = "0.30:1.00:0.01"
freeze_heads_after = 1.0

[dense]
lr = 0.05
milestones = [100]

[dynamic]
lr = 0.005
milestones = [100]
head_lr = 0.1
mode = "decoupled"
"""


@dataclass(frozen=True)
class Recipe:
    """How long each run trains (images per run, held-out ones included)."""

    images: int
    dense_epochs: int
    head_warmup: int
    max_epochs: int  # FTWT epochs at most (the head loss usually stops falling before)

    @property
    def tag(self) -> str:
        return f"n{self.images}-d{self.dense_epochs}-w{self.head_warmup}"


RECIPES = {
    ("cifar", True): Recipe(1024, 6, 3, 2),
    ("cifar", False): Recipe(2560, 15, 4, 6),
    ("imagenet", True): Recipe(256, 1, 2, 2),
    ("imagenet", False): Recipe(640, 4, 4, 4),
}


def family(model: str) -> str:
    return "cifar" if model in ("vgg16_bn", "resnet56") else "imagenet"


def _ftwt(args: list[str], data: str | None, profile: Path | None) -> None:
    """One ``python -m ftwt_cli`` command (this tree's code), its stdout dropped, progress on stderr."""
    command = [sys.executable, "-m", "ftwt_cli", *args]
    if profile is not None:
        command += ["--profile", str(profile), "--data", data]
    console.print("running " + " ".join(command[2:]), highlight=False)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    SPENT["wall_s"] += time.time() - started
    SPENT["cpu_s"] += cpu
    console.print(f"  {time.time() - started:.0f} s wall, {cpu:.0f} s CPU; load {os.getloadavg()[0]:.2f}", highlight=False)


def head_losses(run: Path) -> list[float]:
    """The FTWT run's head loss per epoch (metrics.csv)."""
    with open(run / "metrics.csv", newline="") as f:
        return [float(row["head_loss"]) for row in csv.DictReader(f)]


def train_until_plateau(model: str, run: Path, dense: Path, recipe: Recipe, data: str, profile: Path, extra: list[str]) -> dict:
    """The FTWT run: heads warmed up on the frozen backbone, then epochs while the head loss falls."""
    if not (run / "best.pt").is_file():
        _ftwt(
            ["train", "--model", model, "--init", str(dense), "--target-flops", str(TRAIN_TARGET), "--no-calibrate",
             "--head-warmup", str(recipe.head_warmup), "--samples", str(recipe.images), "--epochs", "1", "--out", str(run), *extra],
            data, profile,
        )  # fmt: skip
    losses = head_losses(run)
    while len(losses) < recipe.max_epochs and (len(losses) < 2 or losses[-2] - losses[-1] > PLATEAU * losses[-2]):
        _ftwt(["train", "--resume", str(run), "--epochs", str(len(losses) + 1)], None, None)  # as the run was configured
        losses = head_losses(run)
    falling = len(losses) >= 2 and losses[-2] - losses[-1] > PLATEAU * losses[-2]
    return {"head_warmup_epochs": recipe.head_warmup, "epochs": len(losses), "head_loss": losses, "stopped": "epoch cap" if falling else "plateau"}


def calibrated(run: Path, level: float, model: str, data: str, profile: Path) -> Path | None:
    """best.pt of ``run`` calibrated to ``level`` % (None when calibration cannot reach it)."""
    out = run / f"calibrated-{level:g}.pt"
    if not out.is_file():
        try:
            _ftwt(["calibrate", str(run / "best.pt"), "--target-flops", f"{level:g}", "--model", model, "--out", str(out)], data, profile)
        except subprocess.CalledProcessError:
            console.print(f"[yellow]calibration of {run.name} to {level:g} % failed; that level is skipped[/yellow]", markup=True)
            return None
    return out


def trained(model: str, directory: Path, quick: bool, levels: list[float], data: str, head_norm_levels: list[float]) -> dict:
    """Train (or reuse) every run of ``model``: ``{"dense": path, "default": {level: path},
    "head_norm": {level: path}, "training": {"default": ..., "head_norm": ...}, "recipe": tag}``."""
    recipe = RECIPES[(family(model), quick)]
    profiles = directory / "profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    profile = profiles / "latency-bench.toml"
    profile.write_text(PROFILE)
    dense_run = directory / f"{model}-dense-{recipe.tag}"
    if not (dense_run / "best.pt").is_file():
        _ftwt(["train", "--model", model, "--dense", "--samples", str(recipe.images), "--epochs", str(recipe.dense_epochs), "--out", str(dense_run)], data, profile)
    out = {"dense": dense_run / "best.pt", "recipe": recipe.tag, "training": {}}
    # The head-norm runs only give the distinct-mask comparison: with --quick, one epoch after the warm-up.
    norm_recipe = Recipe(recipe.images, recipe.dense_epochs, recipe.head_warmup, 1) if quick else recipe
    for variant, extra, wanted, how in (("default", [], levels, recipe), ("head_norm", ["--head-norm"], head_norm_levels, norm_recipe)):
        run = directory / f"{model}-ftwt{TRAIN_TARGET}-{variant}-{recipe.tag}"
        out["training"][variant] = train_until_plateau(model, run, dense_run / "best.pt", how, data, profile, extra)
        out[variant] = {level: path for level in wanted if (path := calibrated(run, level, model, data, profile)) is not None}
    return out


def static_model(model: str, dense_state: dict, reduction_pct: float, input_size: tuple[int, int], directory: Path) -> tuple[torch.nn.Module, float]:
    """The torch-pruning static-uniform model of ``model`` at ``reduction_pct`` % of the FLOPs, and its
    measured reduction; the pruning history is cached (widths are what latency depends on)."""
    cache = directory / "static" / f"{model}-uniform-{reduction_pct:.1f}.json"
    backbone = create_model(model, 10)
    backbone.load_state_dict(dense_state)
    if cache.is_file():
        record = json.loads(cache.read_text())
        return restore(backbone.eval(), record["history"], input_size), record["reduction_pct"]
    result = uniform(backbone, round(reduction_pct, 1), input_size)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"history": plain_history(result.history), "reduction_pct": result.reduction_pct}))
    return result.model.eval(), result.reduction_pct
