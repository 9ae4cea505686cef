"""benchmarks/compare.py end to end on the smoke profile: every method trains through the CLI and the
JSON document has one row per method with measured figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"


def test_compare_quick_json_has_a_row_per_method(tmp_path):
    args = [
        sys.executable, str(SCRIPT), "--profile", "smoke", "--model", "smallnet", "--data", "synthetic",
        "--dense-epochs", "1", "--epochs", "1", "--target-flops", "30", "--checkpoint-dir", str(tmp_path), "--json",
    ]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout)
    rows = {row["method"]: row for row in doc["rows"]}
    assert list(rows) == ["dense", "ftwt", "static-uniform", "static-taylor", "signature-dynamic", "signature-static"]
    assert rows["dense"]["flops_reduction_pct"] == 0
    for name in ("static-uniform", "static-taylor", "signature-static"):
        assert abs(rows[name]["flops_reduction_pct"] - 30) <= 1.0, (name, rows[name])
    for row in rows.values():
        assert 0 <= row["top1"] <= 100 and row["brier_blur_0.9"] is not None and row["brier_noise_0.11"] is not None
    assert doc["verdict"]["holds"] == (doc["verdict"]["ftwt_minus_static_uniform_top1"] >= 2.0)
    # a second run reuses every finished run directory instead of training again
    again = subprocess.run(args, capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert again.returncode == 0 and "reusing" in again.stderr and " epochs → " not in again.stderr
    assert json.loads(again.stdout)["rows"] == doc["rows"]
