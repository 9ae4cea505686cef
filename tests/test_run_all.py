"""benchmarks/run_all.py: the results table is built from each benchmark's JSON, with goals met or not."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"


@pytest.fixture(scope="module")
def run_all():
    spec = importlib.util.spec_from_file_location("run_all", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_from_saved_documents_marks_goals(run_all, tmp_path):
    saved = tmp_path / "results"
    saved.mkdir()
    (saved / "train_overhead.json").write_text(json.dumps({"goal": 1.15, "results": [
        {"model": "vgg16_bn", "ratio": 1.03}, {"model": "resnet56", "ratio": 1.30}]}))
    (saved / "compare.json").write_text(json.dumps({"rows": [
        {"method": "ftwt", "flops_reduction_pct": 50.1, "top1": 60.0},
        {"method": "static-uniform", "flops_reduction_pct": 50.0, "top1": 57.0}],
        "paired": {"ftwt": {"mean": 3.0, "ci95": [-0.5, 6.5]}, "ftwt-kd": {"mean": 2.5, "ci95": [0.5, 4.5]}}}))
    (saved / "latency.json").write_text(json.dumps({
        "resnet34": {"flops_reduction_pct": 51.8, "dense_ms": 70.0, "dense_prepacked_ms": 60.0, "engine_ms": 56.0,
                     "static_ms": 50.0, "static_prepacked_ms": 45.0, "static_flops_reduction_pct": 51.9, "threads": 1,
                     "codebook_k": 4, "batched": {"8": {"speedup": 1.4}}},
        "goals": {"resnet34_ratio": {"goal": 0.85, "measured": 0.39, "met": False},
                  "resnet34_ratio_prepacked": {"goal": 0.6, "measured": 0.13, "met": False},
                  "resnet34_engine_over_static_prepacked": {"goal": 1.10, "measured": 1.24, "met": False},
                  "resnet34_batch8_speedup": {"goal": 1.5, "measured": 1.6, "met": True},
                  "resnet18_ratio": None}}))
    table = tmp_path / "results.md"
    assert run_all.main(["--from", str(saved), "--table", str(table), "--note", "test"]) == 0
    text = table.read_text()
    assert "| train_overhead | FTWT training step ÷ dense step, vgg16_bn | ≤ 1.15 | 1.03 | yes |" in text
    assert "| train_overhead | FTWT training step ÷ dense step, resnet56 | ≤ 1.15 | 1.30 | **no** |" in text
    assert "| compare | default FTWT − static uniform, top-1 at equal FLOPs | ≥ −1 point | +3.0 points | yes |" in text
    # the best variant by its mean, met only when its paired interval excludes zero
    assert "| best FTWT variant − static uniform (paired, 95 % interval) | ≥ +2 points, interval > 0 | ftwt: +3.0 points [-0.5, +6.5] | **no** |" in text
    # latency rows come from the benchmark's own goals; a model that was not run has none
    where = "resnet34, batch 1, 1 thread(s), K = 4, at 51.8 % FLOPs ↓"
    assert f"| latency | latency ↓ ÷ FLOPs ↓ vs dense eager, {where} | ≥ 0.85 | 0.39 (70.00 → 56.00 ms) | **no** |" in text
    assert f"| latency | latency ↓ ÷ FLOPs ↓ vs dense pre-packed, {where} | ≥ 0.6 | 0.13 (60.00 → 56.00 ms) | **no** |" in text
    assert "| latency | engine ÷ static pre-packed latency, resnet34, batch 1, static at 51.9 % FLOPs ↓ | ≤ 1.1 | 1.24 (56.00 vs 45.00 ms) | **no** |" in text
    assert "| latency | batch-8 throughput ÷ dense eager, resnet34 | ≥ 1.5 | 1.60× | yes |" in text
    assert "resnet18" not in text
    assert "budget" not in text.split("| --- |")[-1]  # benchmarks without a saved document are left out


def test_unknown_benchmark_is_refused(run_all, tmp_path):
    assert run_all.main(["--only", "nonsense", "--from", str(tmp_path)]) == 2


def test_full_compare_protocol_reads_apart_from_the_quick_one_and_is_not_run_by_default(run_all, tmp_path, monkeypatch):
    saved = tmp_path / "results"
    saved.mkdir()
    doc = {"dense_epochs": 40, "epochs": 15, "seeds": [0, 1, 2], "rows": [
        {"method": "ftwt", "flops_reduction_pct": 50.0, "top1": 60.0, "top1_std": 1.0},
        {"method": "static-uniform", "flops_reduction_pct": 50.0, "top1": 60.5, "top1_std": 0.5}],
        "paired": {"ftwt": {"mean": -0.5, "ci95": [-2.0, 1.0]}}}  # fmt: skip
    (saved / "compare_full.json").write_text(json.dumps(doc))
    table = tmp_path / "results.md"
    assert run_all.main(["--from", str(saved), "--table", str(table)]) == 0
    text = table.read_text()
    assert "| compare_full | (dense 40, 15 epochs) default FTWT − static uniform, top-1 at equal FLOPs | ≥ −1 point | -0.5 points | yes |" in text
    assert "| compare_full | (dense 40, 15 epochs) ftwt: top-1 at 50.0 % FLOPs ↓ (mean of 3 seeds) | reported | 60.0 % ± 1.0 | – |" in text
    ran = []
    monkeypatch.setattr(run_all, "run", lambda name, *a: ran.append(name) or {})
    monkeypatch.setattr(run_all, "table", lambda docs, note: "")
    assert run_all.main(["--table", str(tmp_path / "t.md")]) == 0
    assert "compare_full" not in ran and "compare" in ran
