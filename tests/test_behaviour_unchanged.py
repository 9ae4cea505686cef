"""The smoke-profile commands of ``.ci/run`` (plus static baselines and ``eval --latency``) give the same
``--json`` documents as the recorded ones in ``tests/golden/smoke.json`` (timings and paths aside): a
refactor must not change behaviour. ``FTWT_RECORD_GOLDEN=1 python -m pytest tests/test_behaviour_unchanged.py``
records them (a deliberate change of behaviour, with a CHANGELOG entry; docs/design.md "Behaviour stays put").

What must match exactly: the commands, every key, value types, list lengths, strings, booleans, integers
(but the trained count ``clusters``) and every float that is not a trained figure (configuration, r, search
steps). Trained figures (FLOPs
percentages, keep fractions, thresholds, top-1, Brier) are sums of floats whose order differs between
CPUs (oneDNN/MKL kernels) and thread counts, and a flipped mask bit or argmax moves them by whole channels
or images; they compare within ``TOLERANCES``, per key family. ``FTWT_GOLDEN_STRICT=1`` compares every
float to 1e-6 relative and every integer exactly: use it on the machine that recorded the file, during
a refactor.

Where the tolerances come from (torch 2.14.1; 256 train / 26 val / 128 test images): this module's
documents recorded on an AMD EPYC (2 cores) with 1 thread (the file), with 2 threads, and with 1 thread
with oneDNN/ATen capped to AVX2 and to SSE4.1; and the file as recorded before on another CPU (the same code
gives this machine's file here). ``TOLERANCES`` lists, per family, the largest difference from the file
seen on this machine (2 threads or capped ISA) and on the other CPU. The other CPU moves far more: for the
taylor signature its static allocation flips a channel per layer (29/49/33 vs 28/51/35 channels), which
gives the largest figures of several families (FLOPs 0.119 pp; dynamic models at most 0.088). Each
tolerance is about 1.3-4x the other CPU's figure and stays below what one image can move the figure (one
test image is 0.78 pp of top-1 and of a FLOPs mean). A run with another seed is reported in every family;
a change as small as the calibration's thresholds moving halfway to the next logit (b4b7ee1: FLOPs 0.15 pp,
offsets 0.002) is not: that is what strict mode is for.

The ``latency`` document (``eval --latency``) compares only its reports' ``samples``, ``threads``,
``flops_reduction_pct`` and ``flops_reduction_no_heads_pct`` (the last when both sides have it): the
sparse engine is being rewritten and the rest of its report will change; the other fields of that
document (the eval part) are compared in the ``eval`` document already.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

GOLDEN = Path(__file__).parent / "golden" / "smoke.json"
RECORD = os.environ.get("FTWT_RECORD_GOLDEN") == "1"
STRICT = os.environ.get("FTWT_GOLDEN_STRICT") == "1"

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


TEST_IMAGE = 100 / 128  # one test image's share of top-1 or of a FLOPs mean (pp), smoke profile
VAL_IMAGE = 100 / 26  # one held-out image's share of best_top1 (pp)

#: (key name, absolute tolerance, relative tolerance, largest difference seen on this machine, and on
#: another CPU) for trained figures; the first full match wins. A key not listed compares exactly (floats
#: to 1e-6 relative), and so does every key in strict mode.
TOLERANCES = [
    ("target_pct", 0.0, 1e-6, 0.0, 0.0),  # the budget asked for: configuration
    (r".*_pct", 0.25, 0.0, 0.018, 0.119),  # FLOPs reductions: < a third of one test image's FLOPs
    (r"(target_)?keep_ratio|layer_keep_(reached|target)", 0.04, 0.0, 1.2e-4, 0.031),  # > 1 of 32 channels, < 1 of 16
    ("core_fraction", 0.125, 0.0, 0.0, 0.078),  # channels every test image keeps: 8 of 64, 2 of 16
    ("clusters", 8, 0.0, 1, 5),  # distinct masks over 128 test images: one flipped bit adds one
    ("offsets", 0.005, 0.0, 3.2e-6, 0.0012),  # calibration thresholds on gate logits
    (r"top1|(best_)?test_top1.*", 6 * TEST_IMAGE, 0.0, 0.0, 4 * TEST_IMAGE),
    ("top5", 8 * TEST_IMAGE, 0.0, 0.0, 6 * TEST_IMAGE),
    ("best_top1", 2 * VAL_IMAGE, 0.0, 0.0, VAL_IMAGE),
    (r"brier(_clean)?", 0.005, 0.0, 7.4e-5, 0.0020),  # one image's Brier spans 0..2: 0.016 of the mean
    ("head_bce", 0.01, 0.0, 8.1e-5, 0.0050),
    ("head_accuracy|precision|recall", 0.075, 0.0, 4.9e-4, 0.049),  # per-layer channel-image fractions
    ("mean_macs", 0.0, 0.004, 7.2e-5, 0.0017),  # relative, as FLOPs percentages of its model
]  # fmt: skip

#: What the latency document keeps (module docstring); the last is compared when both sides have it.
LATENCY_KEYS = ("samples", "threads", "flops_reduction_pct", "flops_reduction_no_heads_pct")


def latency_view(doc: dict) -> dict:
    """The latency document cut to each model's report's ``LATENCY_KEYS`` (a view of a view is itself)."""
    return {"models": [{"latency": {k: v for k, v in (model.get("latency") or {}).items() if k in LATENCY_KEYS}}
                       for model in doc.get("models", [])]}  # fmt: skip


def tolerance(key: str) -> tuple[float, float] | None:
    """(absolute, relative) tolerance for a trained figure under ``key``; None: compare exactly."""
    return next(((a, r) for pattern, a, r, *_ in TOLERANCES if re.fullmatch(pattern, key)), None)


def differences(a, b, where: str = "", key: str = "", strict: bool = False) -> list[str]:
    """Differences between the golden value ``a`` and today's ``b``; ``key`` names the figure (list items
    take their list's key)."""
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = [f"{where}: keys {sorted(set(a) ^ set(b))}"] if set(a) != set(b) else []
        return diffs + [d for k in a if k in b for d in differences(a[k], b[k], f"{where}.{k}", k, strict)]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]", key, strict)]
    if type(a) is not type(b):
        return [f"{where}: {a!r} vs {b!r} (types differ)"]
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        tol = None if strict else tolerance(key)
        if tol is not None:
            ok = math.isclose(a, b, abs_tol=tol[0], rel_tol=tol[1])
        else:
            ok = math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) if isinstance(a, float) else a == b
        return [] if ok else [f"{where}: {a!r} vs {b!r}" + (f" (beyond {tol[0]:g} abs, {tol[1]:g} rel)" if tol else "")]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def compare(golden: dict, today: dict, strict: bool = False) -> list[str]:
    """Differences between two sets of documents (command name → document)."""
    diffs = [] if sorted(golden) == sorted(today) else [f"commands: {sorted(golden)} vs {sorted(today)}"]
    for name in golden:
        if name not in today:
            continue
        a, b = golden[name], today[name]
        if name == "latency":
            a, b = latency_view(a), latency_view(b)
            for x, y in zip(a["models"], b["models"]):  # the no-heads figure only where both report it
                if ("flops_reduction_no_heads_pct" in x["latency"]) != ("flops_reduction_no_heads_pct" in y["latency"]):
                    x["latency"].pop("flops_reduction_no_heads_pct", None)
                    y["latency"].pop("flops_reduction_no_heads_pct", None)
        diffs += differences(a, b, name, strict=strict)
    return diffs


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
    docs["latency"] = latency_view(docs["latency"])
    return docs


def test_smoke_documents_are_unchanged(documents):
    if RECORD:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(documents, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"recorded {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    diffs = compare(golden, documents, strict=STRICT)
    mode = "strict: 1e-6" if STRICT else "tolerances: TOLERANCES"
    assert not diffs, f"{len(diffs)} differences ({mode})\n" + "\n".join(diffs[:40])
