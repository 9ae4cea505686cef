"""The behaviour guard itself (``test_behaviour_unchanged.compare``): perturbed copies of the recorded golden
documents must be reported where a refactor would have changed behaviour, and pass where a CPU's rounding
moves a trained figure. Pure functions on dicts: no training."""

from __future__ import annotations

import copy
import json
import re

import pytest

from test_behaviour_unchanged import GOLDEN, TOLERANCES, compare, tolerance


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def changed(docs: dict, path: tuple, change) -> dict:
    """A deep copy of ``docs`` with the value at ``path`` replaced by ``change(value)``."""
    out = copy.deepcopy(docs)
    parent = out
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = change(parent[path[-1]])
    return out


def step(key: str, docs: dict, path: tuple) -> float:
    """The figure's tolerance at ``path`` in absolute terms."""
    value = docs
    for part in path:
        value = value[part]
    absolute, relative = tolerance(key)
    return max(absolute, relative * abs(value))


#: one trained figure per tolerance family that the smoke documents hold
TRAINED = [
    ("flops_reduction_pct", ("decoupled", "flops_reduction_pct")),
    ("reached_pct", ("budget", "calibration", "reached_pct")),
    ("layer_keep_target", ("budget", "calibration", "layer_keep_target", 2)),
    ("keep_ratio", ("eval", "models", 0, "layers", 2, "keep_ratio")),
    ("core_fraction", ("eval", "models", 0, "layers", 1, "core_fraction")),
    ("clusters", ("eval_budget", "models", 0, "layers", 2, "clusters")),
    ("offsets", ("budget", "calibration", "offsets", 2)),
    ("test_top1", ("budget", "test_top1")),
    ("top5", ("eval_static", "models", 1, "top5")),
    ("best_top1", ("joint", "best_top1")),
    ("brier", ("eval", "models", 0, "brier", 3, "brier")),
    ("head_bce", ("eval", "models", 0, "layers", 0, "head_bce")),
    ("precision", ("eval_static", "models", 1, "layers", 1, "precision")),
    ("mean_macs", ("eval_budget", "models", 0, "mean_macs")),
    ("flops_reduction_pct", ("latency", "models", 0, "latency", "flops_reduction_pct")),
]


def test_the_recorded_documents_match_themselves(golden):
    assert compare(golden, copy.deepcopy(golden)) == []
    assert compare(golden, copy.deepcopy(golden), strict=True) == []


def test_each_tolerance_covers_the_spread_measured_across_cpus_and_threads():
    for pattern, absolute, relative, here, other_cpu in TOLERANCES:
        assert here <= other_cpu <= max(absolute, relative) * (1 if pattern == "target_pct" else 0.8), pattern


def test_every_tolerance_family_is_exercised_below():
    def family(key):
        return next(pattern for pattern, *_ in TOLERANCES if re.fullmatch(pattern, key))

    assert {family(key) for key, _ in TRAINED} == {pattern for pattern, *_ in TOLERANCES} - {"target_pct"}


@pytest.mark.parametrize("key, path", TRAINED, ids=[" ".join(map(str, p)) for _, p in TRAINED])
def test_a_trained_figure_moves_within_its_tolerance_not_beyond(golden, key, path):
    tol = step(key, golden, path)
    within = changed(golden, path, lambda v: v + (tol if isinstance(v, int) else 0.9 * tol))
    beyond = changed(golden, path, lambda v: v + (tol + 1 if isinstance(v, int) else 1.1 * tol))
    assert compare(golden, within) == []
    where = ".".join(str(p) for p in path[:1]) + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path[1:])
    assert [d.split(":")[0] for d in compare(golden, beyond)] == [where]
    assert compare(golden, within, strict=True) != []  # strict mode keeps 1e-6


@pytest.mark.parametrize("path, change", [
    (("budget", "epochs"), lambda v: v + 1),  # integer
    (("budget", "calibration", "steps"), lambda v: v + 1),  # a count
    (("estimate", "dense_macs"), lambda v: v - 1),
    (("estimate", "config", "lr"), lambda v: v * 1.0001),  # a configuration float
    (("estimate", "config", "mode"), lambda v: "joint"),
    (("budget", "r"), lambda v: v + 1e-4),  # chosen by the search: exact
    (("budget", "calibration", "target_pct"), lambda v: v + 0.1),  # the budget asked for: exact
    (("dense", "flops_reduction_pct"), lambda v: 0.0),  # None became a number
    (("budget", "calibration", "converged"), lambda v: not v),
    (("latency", "models", 0, "latency", "threads"), lambda v: v + 1),
    (("latency", "models", 0, "latency", "samples"), lambda v: float(v)),  # a type
])  # fmt: skip
def test_a_changed_exact_value_is_reported(golden, path, change):
    assert len(compare(golden, changed(golden, path, change))) == 1


def test_a_missing_key_a_changed_length_or_a_missing_command_is_reported(golden):
    no_key = copy.deepcopy(golden)
    del no_key["decoupled"]["test_top1"]
    assert compare(golden, no_key) == ["decoupled: keys ['test_top1']"]
    extra_key = changed(golden, ("budget", "calibration"), lambda c: {**c, "new": 1})
    assert compare(golden, extra_key) == ["budget.calibration: keys ['new']"]
    shorter = changed(golden, ("budget", "calibration", "offsets"), lambda v: v[:-1])
    assert compare(golden, shorter) == ["budget.calibration.offsets: 4 items vs 3"]
    fewer = {k: v for k, v in golden.items() if k != "joint"}
    assert len(compare(golden, fewer)) == 1


def test_the_latency_document_compares_only_its_kept_figures(golden):
    report = golden["latency"]["models"][0]["latency"]
    # today's full document: eval figures and report fields the engine rewrite may change are not compared
    today = copy.deepcopy(golden)
    today["latency"] = {"config": {"x": 1}, "models": [{"brier_clean": 0.1, "latency": {**report, "engine_ms": 3.0}}]}
    assert compare(golden, today) == []
    no_heads = changed(golden, ("latency", "models", 0, "latency"),
                       lambda r: {k: v for k, v in r.items() if k != "flops_reduction_no_heads_pct"})
    assert compare(golden, no_heads) == []  # compared only where both sides report it
    no_samples = changed(golden, ("latency", "models", 0, "latency"),
                         lambda r: {k: v for k, v in r.items() if k != "samples"})
    assert compare(golden, no_samples) == ["latency.models[0].latency: keys ['samples']"]
