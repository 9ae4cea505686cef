"""What a run reports: the summary, the per-epoch and per-layer rows (metrics.csv, layers.csv), the
epoch line, and the calibration record as a few labelled figures (one rendering for every output)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from ftwt_cli.core.masks import MaskStats
from ftwt_cli.io import checkpoint as ckpt


@dataclass
class Summary:
    run_dir: str | None
    mode: str
    r: float | None
    epochs: int
    best_top1: float
    test_top1: float  # the last epoch's
    flops_reduction_pct: float | None
    flops_reduction_with_heads_pct: float | None
    estimate: dict | None = None
    selected_on: str = "test"  # the split whose top-1 chose best.pt
    calibration: dict | None = None  # --target-flops: what calibration chose and measured (raw vs calibrated)
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None  # the epoch best.pt holds
    best_test_top1: float | None = None  # best.pt's test top-1 (calibrated, when it was)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "history"}


def layer_rows(epoch: int, split: str, stats: MaskStats | None) -> list[dict]:
    """Per-layer rows of ``layers.csv``: target vs heads' keep rate, precision, recall, BCE, distinct masks."""
    if stats is None:
        return []
    return [{"epoch": epoch, "split": split, **asdict(layer)} for layer in stats.layers()]


def write_table(path: Path, rows: list[dict]) -> None:
    """A CSV of ``rows`` (one dict per row), written atomically; nothing when there are no rows."""
    if rows:
        text = pd.DataFrame(rows).to_csv(index=False).encode()
        ckpt.atomic_write_bytes(path, lambda f: f.write(text))


def epoch_line(row: dict, target_flops: float | None = None) -> str:
    text = f"epoch {row['epoch']}: loss {row['task_loss']:.4f}, train {row['train_top1']:.2f}%"
    if "val_top1" in row:
        text += f", val {row['val_top1']:.2f}%"
    text += f", test {row['test_top1']:.2f}%"
    if "head_acc" in row:
        text += f", heads {row['head_acc']:.2f}% right, FLOPs ↓ {row['flops_reduction_with_heads_pct']:.2f}% (test)"
        if "val_flops_reduction_pct" in row:
            text += f" {row['val_flops_reduction_pct']:.2f}% (held-out)"
        if target_flops is not None:
            text += f" vs target {target_flops:g}%"
        text += " (heads frozen)" if row["heads_frozen"] else f", head loss {row['head_loss']:.4f}"
    return text


#: The three ways a calibration record measures the test split: (label, record key).
CALIBRATION_VIEWS = (("raw heads", "raw"), ("as trained", "trained"), ("calibrated", "calibrated"))


def calibration_figures(record: dict, given: str = "as trained") -> list[tuple[str, float, float]]:
    """(label, test FLOPs reduction %, test top-1 %) of the raw heads, the heads as given and calibrated
    (``given`` names the middle one: "as trained" after training, "as given" for ``ftwt calibrate``)."""
    return [
        (given if key == "trained" else label, record[f"test_reduction_{key}_pct"], record[f"test_top1_{key}"])
        for label, key in CALIBRATION_VIEWS
    ]


def calibration_line(record: dict) -> str:
    """The calibration record in one line (the training log)."""
    return "best.pt on the test split (FLOPs ↓ / top-1): " + ", ".join(
        f"{label} {flops:.2f}% / {top1:.2f}%" for label, flops, top1 in calibration_figures(record)
    )
