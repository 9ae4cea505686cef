"""Why do decision heads under-prune? Train head variants on one frozen dense model and compare them.

One no-grad pass over the training images (augmented, ``--passes`` times) and one over the test images
caches, for every gated block, the head's two possible inputs (global max and global average pool of
the block input) and the ground-truth keep mask at r. Each head variant is then trained as what it is,
a per-block linear classifier, with the paper's optimizer (SGD, momentum 0.9, lr 0.1, batch 128), on the
cached features: seconds per variant instead of minutes of FTWT training. The heads are
*teacher-forced* (every block sees the dense model's input, not the input left by upstream masks), so
this isolates what a head can learn from what training drift adds; ``ftwt train`` runs confirm.

Per variant, on the test images: reached FLOPs reduction (heads' binary masks, producer-aware MACs) vs
the target's, per-layer keep rate of heads vs target, precision / recall of "keep", distinct masks per
layer, and the spread of the head's input after its transform (the softmax-flattening hypothesis).

    python benchmarks/head_probe.py --checkpoint runs/r20-dense/best.pt --model resnet20 [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from _common import CIFAR10_MINI  # noqa: E402 - benchmarks/ is on sys.path when run as a script
from rich.console import Console
from rich.table import Table

from ftwt_cli.algorithms.estimate import find_ratio
from ftwt_cli.console import progress_bar
from ftwt_cli.core.flops import FlopsCounter
from ftwt_cli.core.gating import FTWTModel
from ftwt_cli.core.targets import CumulativeMassTarget
from ftwt_cli.io import loading
from ftwt_cli.io.config import resolve
from ftwt_cli.io.data import make_loader

console = Console(stderr=True)

#: name → (pool, input transform, negative-class weight, lr)
VARIANTS = {
    "paper (max, softmax)": ("max", "softmax", 1.0, 0.1),
    "avg pool, softmax": ("avg", "softmax", 1.0, 0.1),
    "max, no softmax": ("max", "none", 1.0, 0.1),
    "max, softmax, lr 1.0": ("max", "softmax", 1.0, 1.0),
    "max, softmax, balanced BCE": ("max", "softmax", None, 0.1),
    "max, softmax, standardised": ("max", "softmax-std", 1.0, 0.1),
    "max, standardised": ("max", "std", 1.0, 0.1),
    "avg, softmax, standardised": ("avg", "softmax-std", 1.0, 0.1),
}


@torch.no_grad()
def collect(model: FTWTModel, loader, target: CumulativeMassTarget, passes: int, label: str):
    """Per block: max-pooled and avg-pooled block inputs [N, C_in] and target masks [N, C_out]."""
    pooled: dict[str, list[list[torch.Tensor]]] = {"max": [[] for _ in model.blocks], "avg": [[] for _ in model.blocks]}
    truth: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    hooks = []
    for b, block in enumerate(model.blocks):
        def grab(module, args, b=b):
            x = args[0]
            pooled["max"][b].append(x.amax(dim=(2, 3)))
            pooled["avg"][b].append(x.mean(dim=(2, 3)))
        hooks.append(block.register_forward_pre_hook(grab))
    model.eval().configure(mask_source="dense", record=True)
    with progress_bar(label, passes * len(loader)) as advance:
        for _ in range(passes):
            for images, _labels in loader:
                model(images)
                for b, rec in enumerate(model.records()):
                    truth[b].append(target.mask(rec.response))
                advance()
    for h in hooks:
        h.remove()
    cat = lambda parts: [torch.cat(p) for p in parts]  # noqa: E731
    return {k: cat(v) for k, v in pooled.items()}, cat(truth)


def train_heads(features, truth, transform, neg_weight, lr, epochs, seed=0):
    """Per-block linear heads on cached features; returns (weights, biases, input statistics)."""
    gen = torch.Generator().manual_seed(seed)
    heads = []
    for x_raw, g in zip(features, truth):
        stats = None
        if transform in ("softmax-std", "std"):
            base = x_raw.softmax(1) if transform == "softmax-std" else x_raw
            stats = (base.mean(0), base.std(0).clamp_min(1e-6))
        x = apply(x_raw, transform, stats)
        lin = torch.nn.Linear(x.shape[1], g.shape[1])
        opt = torch.optim.SGD(lin.parameters(), lr=lr, momentum=0.9)
        y = g.float()
        if neg_weight is None:  # balanced: weigh each class by the other's frequency, per filter
            pos_rate = y.mean(0).clamp(0.02, 0.98)
            w_pos, w_neg = 0.5 / pos_rate, 0.5 / (1 - pos_rate)
        else:
            w_pos, w_neg = torch.ones(y.shape[1]), torch.full((y.shape[1],), neg_weight)
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), 128):
                idx = order[i : i + 128]
                logits = lin(x[idx])
                weight = y[idx] * w_pos + (1 - y[idx]) * w_neg
                loss = F.binary_cross_entropy_with_logits(logits, y[idx], weight=weight, reduction="none").sum(1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        heads.append((lin, stats))
    return heads


def apply(x, transform, stats):
    if transform == "softmax":
        return x.softmax(1)
    if transform == "none":
        return x
    base = x.softmax(1) if transform == "softmax-std" else x
    return (base - stats[0]) / stats[1]


def evaluate(heads, features, truth, transform, counter: FlopsCounter):
    masks, layers = [], []
    for (lin, stats), x_raw, g in zip(heads, features, truth):
        x = apply(x_raw, transform, stats)
        with torch.no_grad():
            m = lin(x) > 0
        masks.append(m)
        tp = (m & g).sum().item()
        layers.append({
            "target_keep": g.float().mean().item(),
            "head_keep": m.float().mean().item(),
            "precision": tp / max(m.sum().item(), 1),
            "recall": tp / max(g.sum().item(), 1),
            "distinct": len({tuple(row.tolist()) for row in m}),
            "input_spread": x.std(0).mean().item(),  # across images, mean over channels
        })
    reached = float(counter.reduction_pct(counter.macs_from_masks(masks).mean().item(), with_heads=True))
    target = float(counter.reduction_pct(counter.macs_from_masks(truth).mean().item(), with_heads=True))
    return reached, target, layers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--data", default=f"imagefolder:{CIFAR10_MINI}")
    p.add_argument("--target-flops", type=float, default=50.0)
    p.add_argument("--epochs", type=int, default=6, help="head training epochs over the cached training features")
    p.add_argument("--passes", type=int, default=2, help="augmented passes over the training images to cache")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = resolve("resnet56-cifar10", model=args.model, data=args.data, workers=0)
    dense = loading.load_model(cfg, args.checkpoint, require="dense").model
    model = FTWTModel(dense, loading.input_size(cfg))
    train_loader = make_loader(loading.dataset(cfg, "train", augment=True), 256)
    search = find_ratio(model, make_loader(loading.dataset(cfg, "train"), 256), torch.device("cpu"), args.target_flops, 0.25)
    target = CumulativeMassTarget(search.chosen_r)
    console.print(f"r = {search.chosen_r:.4f}, estimate {search.estimated_reduction_pct:.2f}% (no heads)")
    train_x, train_g = collect(model, train_loader, target, 1 if args.quick else args.passes, "cache train")
    test_x, test_g = collect(model, make_loader(loading.dataset(cfg, "test"), 256), target, 1, "cache test")
    counter = FlopsCounter(model.graph)
    rows = []
    for name, (pool, transform, neg_weight, lr) in VARIANTS.items():
        heads = train_heads(train_x[pool], train_g, transform, neg_weight, lr, args.epochs)
        reached, target_pct, layers = evaluate(heads, test_x[pool], test_g, transform, counter)
        rows.append({"variant": name, "reached_pct": reached, "target_pct": target_pct, "layers": layers})
    table = Table("variant", "reached", "target", "distinct masks (min–max)", "precision", "recall", "input spread",
                  title=f"teacher-forced heads, {args.epochs} epochs, r = {search.chosen_r:.4f}")
    for row in rows:
        ls = row["layers"]
        mean = lambda k: sum(l[k] for l in ls) / len(ls)  # noqa: E731,E741
        table.add_row(row["variant"], f"{row['reached_pct']:.1f}%", f"{row['target_pct']:.1f}%",
                      f"{min(l['distinct'] for l in ls)}–{max(l['distinct'] for l in ls)}",
                      f"{mean('precision'):.3f}", f"{mean('recall'):.3f}", f"{mean('input_spread'):.4f}")
    console.print(table)
    if args.json:
        json.dump({"r": search.chosen_r, "estimate_pct": search.estimated_reduction_pct, "rows": rows}, sys.stdout)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
