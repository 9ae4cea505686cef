"""Cost of an FTWT decoupled training step relative to a dense one (speed goal: ≤ 1.15).

For each model, on the same preloaded batches of cifar10-mini (data loading costs nothing for both):

* dense — the backbone, one SGD optimizer, cross-entropy;
* ftwt  — a gated copy of the same weights in decoupled mode at r = 0.9: heads predict and apply
          masks, targets come from the unmasked outputs, loss = CE + head loss, two SGD optimizers.

Both run :func:`ftwt_cli.workflows.train.objectives.train_step`, the step ``ftwt train`` runs. Steps alternate
(dense, ftwt, dense, ...) so drifting machine load hits both; the ratio is median(ftwt) / median(dense).

    python benchmarks/train_overhead.py [--quick] [--json] [--steps 20] [--models vgg16_bn,resnet56]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import CIFAR10_MINI  # noqa: E402 - benchmarks/ is on sys.path when run as a script
from rich.console import Console
from rich.progress import Progress

from ftwt_cli.core.gating import FTWTModel
from ftwt_cli.core.targets import make_target
from ftwt_cli.io.config import resolve, resolve_device
from ftwt_cli.io.data import build_dataset, parse_data, subset
from ftwt_cli.models import create_model
from ftwt_cli.workflows.train.objectives import CrossEntropyObjective, Loss, MaskObjective, train_step
from ftwt_cli.workflows.train.spec import RunSpec

DEFAULT_DATA = CIFAR10_MINI
GOAL = 1.15
WARMUP_STEPS = 2

console = Console(stderr=True)


def preload(root: str, images: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Decoded, normalised training batches (a deterministic subset), ready to feed."""
    dataset = subset(build_dataset(parse_data(f"imagefolder:{root}"), "train"), images, seed=0)
    pairs = [dataset[i] for i in range(len(dataset))]
    x = torch.stack([p[0] for p in pairs])
    y = torch.tensor([p[1] for p in pairs])
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x) - batch_size + 1, batch_size)]


def make_stepper(model_name: str, batches, device: torch.device):
    """Two closures, each running one training step of its variant on the next batch."""
    cfg = resolve("quickstart", model=model_name)
    torch.manual_seed(0)
    dense = create_model(model_name, 10).to(device).train()
    gated = FTWTModel(copy.deepcopy(dense), (32, 32)).to(device).train()
    target = make_target("mass", 0.9)
    gated.configure(mask_source="predicted", record=True, target=target, decoupled=True)
    variants = {
        "dense": (dense, Loss(), CrossEntropyObjective(RunSpec(cfg, "dense")).optimizers(dense)),
        "ftwt": (gated, Loss(target), MaskObjective(RunSpec(cfg, "ftwt", init="-"), target).optimizers(gated)),
    }
    position = {"dense": 0, "ftwt": 0}

    def step(key: str) -> float:
        model, objective, optimizers = variants[key]
        images, labels = batches[position[key] % len(batches)]
        position[key] += 1
        images, labels = images.to(device), labels.to(device)
        start = time.perf_counter()
        train_step(model, model, images, labels, objective, list(optimizers.values()))  # ends with a host sync
        return time.perf_counter() - start

    return step


def measure(model_name: str, batches, steps: int, device: torch.device, progress: Progress) -> dict:
    step = make_stepper(model_name, batches, device)
    for _ in range(WARMUP_STEPS):  # allocator, thread pool, first-call dispatch
        step("dense"), step("ftwt")
    times: dict[str, list[float]] = {"dense": [], "ftwt": []}
    task = progress.add_task(model_name, total=2 * steps)
    for _ in range(steps):
        for key in times:
            times[key].append(step(key))
            progress.advance(task)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"model": model_name, "seconds": times, "median_seconds": medians, "ratio": medians["ftwt"] / medians["dense"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6 timed steps per variant (a few minutes on 2 CPU cores)")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--data", default=DEFAULT_DATA, help="cifar10-mini root (ImageFolder layout)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 20; quick 6)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--models", default="vgg16_bn,resnet56")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    steps = args.steps or (6 if args.quick else 20)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.data, "train").is_dir():
        console.print(f"[red]error:[/red] no train/ folder under {args.data}")
        return 2
    device = resolve_device(args.device)
    batches = preload(args.data, args.batch_size * min(steps, 8), args.batch_size)
    console.print(f"batch {args.batch_size}, {steps} timed steps per variant, {device}, {torch.get_num_threads()} threads")
    results = []
    with Progress(console=console, transient=True) as progress:
        for name in args.models.split(","):
            results.append(measure(name.strip(), batches, steps, device, progress))
    for res in results:
        med = res["median_seconds"]
        console.print(
            f"{res['model']:>10}: dense {1000 * med['dense']:.1f} ms/step, ftwt {1000 * med['ftwt']:.1f} ms/step "
            f"→ ratio {res['ratio']:.3f} (goal ≤ {GOAL})"
        )
    met = all(r["ratio"] <= GOAL for r in results)
    console.print("goal met" if met else "[yellow]goal missed[/yellow]")
    if args.json:
        doc = {
            "batch_size": args.batch_size,
            "steps": steps,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "goal": GOAL,
            "goal_met": met,
            "results": results,
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
