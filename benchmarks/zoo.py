"""The model zoo through ftwt, as a new user would take it: torchvision's classification models and timm's
common CNN families, random weights saved as a plain state_dict, at 32×32 and 224×224.

Per model and size, through the real CLI (in process): ``estimate``, ``train --r 0.9 --epochs 1``,
``calibrate``, ``eval``, then the sparse engine's exactness check (engine logits and masks against the
gated model's on test images) and ``export --format torchscript`` (checked at export). Each step reports
ok / refused (exit 2, the one-line reason) / error, and its time; a model refused or failing at one step
skips the rest. Dense MACs (ftwt's conv + linear accounting) are compared with ptflops' count of the same
layers (ptflops adds bias MACs, reported apart so that the two must agree exactly).

    python benchmarks/zoo.py --quick --json > zoo.json          # the whole list, tiny runs
    python benchmarks/zoo.py --models torchvision:resnet18,timm:efficientnet_b0 --sizes 32
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's ftwt first

import torch  # noqa: E402
from ptflops import get_model_complexity_info  # noqa: E402
from torch import nn  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from ftwt_cli.cli import app  # noqa: E402
from ftwt_cli.core.graph import UnsupportedModel, analyze  # noqa: E402
from ftwt_cli.engine import build_engine  # noqa: E402
from ftwt_cli.io import config as config_mod  # noqa: E402
from ftwt_cli.io import loading  # noqa: E402
from ftwt_cli.models import create_model  # noqa: E402
from ftwt_cli.models.zoo import torchvision_names  # noqa: E402

#: timm's common CNN families (one model each, the family's usual small member).
TIMM_MODELS = [
    "resnet18", "resnet50d", "efficientnet_b0", "mobilenetv3_small_100", "mobilenetv3_large_100", "regnetx_002",
    "regnety_002", "ghostnet_100", "cspdarknet53", "cspresnet50", "rexnet_100", "repvgg_a0", "densenet121",
    "vgg11_bn", "mixnet_s", "dla34",
]  # fmt: skip
SIZES = (32, 224)
#: The zoo's profile: tiny passes (``--quick``: 8 images a pass; otherwise 64), one epoch.
PROFILE = """description = "benchmarks/zoo.py: tiny runs of every zoo model"
model = "smallnet"
data = "synthetic"
samples = {n}
train_samples = {train}
test_samples = {n}
val_fraction = 0.25
batch_size = 4
ratios = "0.80:1.00:0.05"
r = 0.9

[dense]
epochs = 1
milestones = [1]

[dynamic]
epochs = 1
milestones = [1]
"""
STEPS = ("estimate", "train", "calibrate", "eval", "engine", "export")


def zoo_list() -> list[str]:
    timm_models = []
    try:
        import timm  # noqa: F401 - optional: the timm part of the zoo runs only where timm is installed

        timm_models = [f"timm:{name}" for name in TIMM_MODELS]
    except ImportError:
        print("timm is not installed: only torchvision models (pip install 'ftwt[timm]')", file=sys.stderr)
    return [f"torchvision:{name}" for name in torchvision_names()] + timm_models


def macs_against_ptflops(model: nn.Module, size: int) -> dict:
    """ftwt's dense MACs against ptflops' count of the same layers (conv and linear, biases apart)."""
    graph = analyze(model, (size, size))
    others = list({type(m) for m in model.modules() if not isinstance(m, (nn.Conv2d, nn.Linear)) and not list(m.children())})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counted, _ = get_model_complexity_info(
            model, (3, size, size), print_per_layer_stat=False, as_strings=False, ignore_modules=others,
            backend="pytorch", backend_specific_config={"count_functional": False},
        )  # fmt: skip
        total, params = get_model_complexity_info(model, (3, size, size), print_per_layer_stat=False, as_strings=False, backend="pytorch")
    modules = dict(model.named_modules())
    bias = sum(c.out_channels * c.out_hw[0] * c.out_hw[1] for c in graph.convs if modules[c.name].bias is not None)
    bias += sum(lin.out_features for lin in graph.linears if modules[lin.name].bias is not None)
    return {
        "ftwt_dense_macs": int(graph.dense_macs),
        "ptflops_conv_linear_macs": int(counted),
        "ptflops_bias_macs": int(bias),
        "macs_match_ptflops": int(graph.dense_macs) + int(bias) == int(counted),
        "ptflops_total_macs": int(total),
        "params": int(params),
    }


def cli(args: list[str]) -> tuple[str, str, dict | None, float]:
    """(status, one-line message, --json document, seconds) of one ftwt command."""
    start = time.perf_counter()
    result = CliRunner().invoke(app, [*args, "--json"])
    seconds = time.perf_counter() - start
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    rest = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    message = lines[-1][len("error: ") :] if lines else (rest[-1] if rest else "")
    if result.exit_code == 0:
        return "ok", "", json.loads(result.stdout), seconds
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        message = f"{type(result.exception).__name__}: {result.exception}"
    return ("refused" if result.exit_code == 2 else "error"), message or f"exit {result.exit_code}", None, seconds


def engine_check(spec: str, size: int, checkpoint: str, images: int) -> dict:
    """Engine logits and masks against the gated model's on the first test images."""
    cfg = config_mod.resolve(None, model=spec, image_size=size, batch_size=images, test_samples=images, device="cpu")
    loaded = loading.load_model(cfg, checkpoint, require="ftwt")
    model = loaded.model.eval().configure(mask_source="predicted", record=True)
    batch = next(iter(torch.utils.data.DataLoader(loading.dataset(cfg, "test"), batch_size=images)))[0]
    with torch.no_grad():
        expected = model(batch)
    masks = [r.mask.bool() for r in model.records()]
    model.configure(record=False)
    engine = build_engine(model)
    worst, same_masks = 0.0, True
    for i in range(batch.shape[0]):
        got = engine(batch[i : i + 1])
        worst = max(worst, (got - expected[i : i + 1]).abs().max().item())
        same_masks &= all(torch.equal(e, m[i]) for e, m in zip(engine.block_masks(), masks))
    scale = expected.abs().max().item()
    finite = bool(torch.isfinite(expected).all())
    exact = finite and same_masks and worst <= 1e-4 * max(1.0, scale)
    return {"max_abs_diff": worst, "logit_scale": scale, "finite": finite, "masks_equal": same_masks, "exact": exact}


def run_model(spec: str, size: int, work: Path, quick: bool, steps: tuple[str, ...] = STEPS) -> dict:
    images = 8 if quick else 64
    profile = work / "zoo.toml"
    work.mkdir(parents=True, exist_ok=True)
    profile.write_text(PROFILE.format(n=images, train=2 * images))
    common = ["--profile", str(profile), "--model", spec, "--image-size", str(size), "--device", "cpu"]
    row: dict = {"model": spec, "size": size, "steps": {}}
    start = time.perf_counter()
    torch.manual_seed(0)
    try:
        dense = create_model(spec, 10)
        row.update(macs_against_ptflops(dense, size))
    except (UnsupportedModel, Exception) as exc:  # noqa: BLE001 - the estimate step reports the same refusal
        row["macs_error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        dense = dense if "dense" in locals() else None
    folder = work / f"{spec.replace(':', '_')}-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "dense.pt"
    if dense is not None:
        try:
            torch.save(dense.state_dict(), weights)
        except (OSError, RuntimeError) as exc:  # a full disk: this model's row says so, the zoo goes on
            row["steps"] = {step: {"status": "error" if step == steps[0] else "skipped"} for step in steps}
            row["steps"][steps[0]]["message"] = f"saving the random weights failed: {type(exc).__name__}: {exc}"[:300]
            return _finished(row, start)
    del dense
    run = folder / "run"
    commands = {
        "estimate": ["estimate", *common, "--checkpoint", str(weights)],
        "train": ["train", *common, "--init", str(weights), "--r", "0.9", "--out", str(run)],
        "calibrate": ["calibrate", str(run / "best.pt"), *common, "--target-flops", "10", "--out", str(folder / "calibrated.pt")],
        "eval": ["eval", *common, "--checkpoint", str(folder / "calibrated.pt")],
    }  # fmt: skip
    for step in steps:
        if any(r["status"] != "ok" for r in row["steps"].values()):
            row["steps"][step] = {"status": "skipped"}
            continue
        if step == "engine":
            t = time.perf_counter()
            try:
                check = engine_check(spec, size, str(folder / "calibrated.pt"), 2 if quick else 8)
                status = "ok" if check["exact"] else "error"
                row["steps"][step] = {"status": status, "seconds": time.perf_counter() - t, **check}
            except Exception as exc:  # noqa: BLE001 - reported, the zoo goes on
                row["steps"][step] = {"status": "error", "message": f"{type(exc).__name__}: {exc}"[:300], "seconds": time.perf_counter() - t}
            continue
        if step == "export":
            args = ["export", str(folder / "calibrated.pt"), "--format", "torchscript", "--out", str(folder / "model.ts"),
                    "--profile", str(profile), "--check-samples", "4"]  # fmt: skip
        else:
            args = commands[step]
        status, message, doc, seconds = cli(args)
        result = {"status": status, "seconds": seconds}
        if message:
            result["message"] = message
        if doc and step == "estimate":
            row["gated_blocks"] = len(doc["estimates"][0]["per_layer_keep"])
            result["reduction_at_r0.9_pct"] = next((e["flops_reduction_pct"] for e in doc["estimates"] if abs(e["r"] - 0.9) < 1e-9), None)
        if doc and step == "train":
            result["flops_reduction_pct"] = doc.get("flops_reduction_pct")
        if doc and step == "calibrate":
            result["reached_pct"] = doc.get("reached_pct")
        if doc and step == "eval":
            result["flops_reduction_pct"] = doc["models"][0]["flops_reduction_pct"]
        if doc and step == "export":
            result["max_abs_diff"] = doc.get("check", {}).get("max_abs_diff")
        row["steps"][step] = result
    return _finished(row, start)


def _finished(row: dict, start: float) -> dict:
    row["seconds"] = time.perf_counter() - start
    row["passed"] = all(r["status"] == "ok" for r in row["steps"].values())
    refused = [r for r in row["steps"].values() if r["status"] == "refused"]
    row["refused"] = refused[0]["message"] if refused else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny runs: 8 images a pass, engine check on 2")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--models", help="comma list of model specs (default: the whole zoo)")
    parser.add_argument("--sizes", default="32,224", help="comma list of image sizes")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma list of steps, in order (default {','.join(STEPS)})")
    parser.add_argument("--jsonl", help="append each model's row to this file as it finishes")
    parser.add_argument("--work", help="folder for weights and runs (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep each model's weights and runs (default: removed once its row is written)")
    args = parser.parse_args()
    models = args.models.split(",") if args.models else zoo_list()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        for size in sizes:
            for spec in models:
                row = run_model(spec, size, work, args.quick, tuple(args.steps.split(",")))
                rows.append(row)
                verdict = "pass" if row["passed"] else (f"refused: {row['refused']}" if row["refused"] else "FAIL")
                print(f"{spec} @{size}: {verdict} ({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
                if args.jsonl:
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps(row) + "\n")
                if not args.keep:  # the big models' checkpoints would fill the disk over a whole zoo run
                    shutil.rmtree(work / f"{spec.replace(':', '_')}-{size}", ignore_errors=True)
    summary = {
        size: {
            "passed": [r["model"] for r in rows if r["size"] == size and r["passed"]],
            "refused": {r["model"]: r["refused"] for r in rows if r["size"] == size and r["refused"]},
            "failed": [r["model"] for r in rows if r["size"] == size and not r["passed"] and not r["refused"]],
        }
        for size in sizes
    }
    if args.json:
        json.dump({"quick": args.quick, "summary": summary, "models": rows}, sys.stdout, indent=1)
        sys.stdout.write("\n")


if __name__ == "__main__":
    main()
