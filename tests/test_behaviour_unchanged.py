"""The smoke-profile commands of ``.ci/run`` (plus static baselines and ``eval --latency``) give the same
``--json`` documents as they did before the code was reorganised into layers (timings and paths aside).

``tests/golden/smoke.json`` was recorded from the tree before the move, and recorded again once after it
for two deliberate changes stated in the CHANGELOG (the new ``head`` key; a predefined signature's
checkpoint is judged against its own per-block counts, which changed only that model's per-layer
target figures). ``FTWT_RECORD_GOLDEN=1 python -m pytest tests/test_behaviour_unchanged.py`` records it. Floats compare to 1e-6 relative: the same computation in another order may
round differently, a changed computation would not stay that close.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

GOLDEN = Path(__file__).parent / "golden" / "smoke.json"
RECORD = os.environ.get("FTWT_RECORD_GOLDEN") == "1"

#: (name, arguments); {w} is the work folder. The order matters: later runs start from earlier ones.
COMMANDS = [
    ("estimate", ["estimate", "--profile", "smoke"]),
    ("search", ["search", "--profile", "smoke", "--target-flops", "30"]),
    ("dense", ["train", "--profile", "smoke", "--dense", "--epochs", "1", "--out", "{w}/dense"]),
    ("decoupled", ["train", "--profile", "smoke", "--init", "{w}/dense/best.pt", "--r", "0.9", "--epochs", "1",
                   "--mode", "decoupled", "--out", "{w}/decoupled"]),
    ("joint", ["train", "--profile", "smoke", "--init", "{w}/dense/best.pt", "--r", "0.9", "--epochs", "1",
               "--mode", "joint", "--out", "{w}/joint"]),
    ("eval", ["eval", "--profile", "smoke", "--checkpoint", "{w}/decoupled/best.pt", "--brier-noise"]),
    ("budget", ["train", "--profile", "smoke", "--init", "{w}/dense/best.pt", "--target-flops", "40", "--epochs", "2",
                "--out", "{w}/budget"]),
    ("calibrate", ["calibrate", "{w}/budget/last.pt", "--profile", "smoke", "--target-flops", "25",
                   "--out", "{w}/budget/p25.pt"]),
    ("eval_budget", ["eval", "--profile", "smoke", "--checkpoint", "{w}/budget/p25.pt", "--compare",
                     "{w}/budget/best.pt", "--plots", "{w}/plots"]),
    ("static_uniform", ["train", "--profile", "smoke", "--init", "{w}/dense/best.pt", "--static", "uniform",
                        "--target-flops", "30", "--epochs", "1", "--out", "{w}/uniform"]),
    ("signature", ["train", "--profile", "smoke", "--init", "{w}/dense/best.pt", "--signature", "taylor",
                   "--target-flops", "30", "--epochs", "1", "--out", "{w}/signature"]),
    ("eval_static", ["eval", "--profile", "smoke", "--checkpoint", "{w}/uniform/best.pt", "--compare",
                     "{w}/signature/best.pt"]),
    ("latency", ["eval", "--profile", "smoke", "--checkpoint", "{w}/decoupled/best.pt", "--latency",
                 "--latency-samples", "4"]),
]  # fmt: skip

#: Keys whose values are timings, or choices made from timings (which path the engine measured faster).
TIMED = {
    "dense_ms", "engine_ms", "dense_p90_ms", "engine_p90_ms", "latency_reduction_pct", "ratio", "fallback",
    "sparse_layers", "sparse_layer_count", "layers_latency", "calibration_latency", "dense_channels_last",
    "dense_default_ms", "dense_channels_last_ms", "cache_hit_rate", "strategy_counts", "core_mac_fraction",
    "wall_s", "engine_channels_last", "prototype_use", "max_abs_error", "max_rel_error", "mask_mismatches",
}  # fmt: skip


def normalise(value, work: str):
    """Paths made relative to the work folder; timings dropped; the latency report's per-layer timings and
    build-time measurement renamed so that they are dropped too."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in ("layers", "calibration") and isinstance(value.get("cache_mb"), (int, float)):
                key = f"{key}_latency"  # inside a latency report: timings
            if key in TIMED:
                continue
            out[key] = normalise(item, work)
        return out
    if isinstance(value, list):
        return [normalise(v, work) for v in value]
    if isinstance(value, str):
        value = value.replace(work, "{w}")
        if value.endswith("quickstart-dense.pt") or value.endswith("profiles/checkpoints"):
            return Path(value).name
        return value
    return value


#: Keys added to the documents since the golden file was recorded (each an addition in the CHANGELOG);
#: every other key must still be there with its value.
#: configuration fields: the accuracy options, and --image-size; the training summary's best.pt figures (CHANGELOG, Unreleased)
ADDED = {"gate", "codebook", "distill", "distill_weight", "bn_reestimate", "image_size", "best_epoch", "best_test_top1", "normalization"}


def same(a, b, where: str = "") -> list[str]:
    """Differences between the golden document ``a`` and today's ``b`` (floats to 1e-6 relative)."""
    if isinstance(a, dict) and isinstance(b, dict):
        changed = (set(a) ^ set(b)) - ADDED
        diffs = [f"{where}: keys {sorted(changed)}"] if changed else []
        return diffs + [d for k in a if k in b for d in same(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return [] if math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) else [f"{where}: {a!r} vs {b!r}"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    from ftwt_cli.cli import app
    work = tmp_path_factory.mktemp("smoke")
    runner = CliRunner()
    docs = {}
    for name, args in COMMANDS:
        result = runner.invoke(app, [a.format(w=work) for a in args] + ["--json"])
        assert result.exit_code == 0, (name, result.stderr[-3000:])
        docs[name] = normalise(json.loads(result.stdout), str(work))
    return docs


def test_smoke_documents_are_unchanged(documents):
    if RECORD:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(documents, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"recorded {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    assert sorted(golden) == sorted(name for name, _ in COMMANDS)
    diffs = [d for name in golden for d in same(golden[name], documents[name], name)]
    assert not diffs, "\n".join(diffs[:40])
