"""``ftwt profiles``, ``ftwt estimate`` and ``ftwt search`` through Typer's CliRunner, bad inputs included."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from ftwt_cli.algorithms.estimate import SEARCH_DEPTH, UnreachableTarget, bisect_ratio
from ftwt_cli.core.gating import FTWTModel
from ftwt_cli.io.checkpoint import save_checkpoint
from ftwt_cli.models import create_model

FAST = ("--profile", "smoke", "--samples", "64")


def ok_json(result) -> dict:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return json.loads(result.stdout)


def assert_bad_input(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""  # nothing on stdout, in particular no partial JSON
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]


def test_profiles_json(run_cli):
    rows = ok_json(run_cli("profiles", "--json"))
    by_name = {row["name"]: row for row in rows}
    assert {"quickstart", "smoke", "vgg16_bn-cifar10", "resnet56-cifar10", "mobilenetv1-cifar10"} <= set(by_name)
    assert [row["name"] for row in rows if row["default"]] == ["quickstart"]
    assert all(row["description"] for row in rows)


def test_estimate_smoke_json(run_cli):
    result = run_cli("estimate", "--profile", "smoke", "--json")
    doc = ok_json(result)
    assert doc["dense_macs"] == 3_392_128 and doc["samples"] == 256
    # no checkpoint in the smoke profile: a one-line warning on stderr says what the numbers are worth
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "initialised" in warning[0] and "--checkpoint" in warning[0]
    assert [row["r"] for row in doc["estimates"]] == [0.8, 0.85, 0.9, 0.95, 1.0]
    for row in doc["estimates"]:
        assert set(row) >= {"r", "flops_reduction_pct", "flops_reduction_with_heads_pct", "per_layer_keep"}
        assert row["flops_reduction_with_heads_pct"] < row["flops_reduction_pct"] < 100
        assert len(row["per_layer_keep"]) == 4
        assert all(0 < keep <= 1 for keep in row["per_layer_keep"].values())
    reductions = [row["flops_reduction_pct"] for row in doc["estimates"]]
    assert reductions == sorted(reductions, reverse=True)
    assert "chosen_r" not in doc


def test_estimate_is_reproducible_without_a_checkpoint(run_cli):
    first = ok_json(run_cli("estimate", *FAST, "--ratios", "0.9", "--json"))
    second = ok_json(run_cli("estimate", *FAST, "--ratios", "0.9", "--json"))
    assert first["estimates"] == second["estimates"]


def test_estimate_target_chooses_the_nearest_r(run_cli):
    doc = ok_json(run_cli("estimate", *FAST, "--ratios", "0.5:1.0:0.05", "--target-flops", "40", "--json"))
    assert len(doc["estimates"]) == 11
    nearest = min(doc["estimates"], key=lambda row: abs(row["flops_reduction_pct"] - 40))
    assert doc["nearest_table_r"] == nearest["r"] and doc["target"] == 40
    # the chosen r is search's bisection on the same pass, within its default tolerance of the target
    assert abs(doc["chosen_reduction_pct"] - 40) <= 0.25


def test_estimate_help_says_the_target_is_removed_flops(run_cli):
    result = run_cli("estimate", "--help")
    assert result.exit_code == 0
    assert "REMOVE" in result.output and "halves" in result.output


def test_estimate_writes_csv(run_cli, tmp_path):
    out = tmp_path / "nested" / "estimate.csv"
    result = run_cli("estimate", *FAST, "--ratios", "0.85,0.95", "--csv", out)
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out)
    assert frame["r"].tolist() == [0.85, 0.95]
    assert {"flops_reduction_pct", "flops_reduction_with_heads_pct", "keep/features.0"} <= set(frame.columns)
    assert frame["flops_reduction_pct"].is_monotonic_decreasing


def test_estimate_with_a_dense_checkpoint(run_cli, tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "dense.pt"
    meta = {"kind": "dense", "model": "smallnet", "num_classes": 10, "input_size": [32, 32], "data": "synthetic"}
    save_checkpoint(path, create_model("smallnet", 10), meta)
    doc = ok_json(run_cli("estimate", *FAST, "--checkpoint", path, "--ratios", "0.9", "--json"))
    assert doc["checkpoint"] == str(path)


@pytest.fixture
def bad_checkpoints(tmp_path):
    """A resnet20 checkpoint, one labelled smallnet that holds resnet20 weights, and an FTWT one."""
    dense_meta = {"kind": "dense", "num_classes": 10, "input_size": [32, 32], "data": "synthetic"}
    resnet = create_model("resnet20", 10)
    save_checkpoint(tmp_path / "resnet20.pt", resnet, dense_meta | {"model": "resnet20"})
    save_checkpoint(tmp_path / "mislabelled.pt", resnet, dense_meta | {"model": "smallnet"})
    ftwt = FTWTModel(create_model("smallnet", 10), (32, 32))
    save_checkpoint(tmp_path / "ftwt.pt", ftwt, dense_meta | {"model": "smallnet", "kind": "ftwt", "r": 0.9})
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "empty_data").mkdir()
    return tmp_path


BAD_ESTIMATE_INPUTS = [
    (("--ratios", "0:1:0.1"), ("r must be in",)),
    (("--ratios", "0.9,1.2"), ("r must be in", "1.2")),
    (("--ratios", "0.9:x:0.1"), ("--ratios",)),
    (("--target-flops", "0"), ("--target-flops", "(0, 100)")),
    (("--target-flops", "100"), ("--target-flops",)),
    (("--target-flops", "-5"), ("--target-flops",)),
    (("--profile", "nope"), ("unknown profile", "nope")),
    (("--model", "nope"), ("unknown model", "nope")),
    (("--data", "mnist"), ("unknown dataset", "mnist")),
    (("--batch-size", "0"), ("--batch-size",)),
    (("--checkpoint", "{tmp}/missing.pt"), ("checkpoint not found",)),
    (("--checkpoint", "{tmp}/garbage.pt"), ("cannot read checkpoint",)),
    (("--checkpoint", "{tmp}/resnet20.pt"), ("resnet20", "smallnet")),
    (("--checkpoint", "{tmp}/mislabelled.pt"), ("does not fit",)),
    (("--checkpoint", "{tmp}/ftwt.pt"), ("needs a dense",)),
    (("--data", "imagefolder:{tmp}/empty_data"), ("no train/",)),
    (("--data", "imagefolder:{tmp}/no_such_folder"), ("not found",)),
]


@pytest.mark.parametrize("args, words", BAD_ESTIMATE_INPUTS, ids=[" ".join(a) for a, _ in BAD_ESTIMATE_INPUTS])
def test_estimate_bad_input_is_one_line_exit_2_and_writes_nothing(run_cli, bad_checkpoints, args, words):
    before = sorted(p.name for p in bad_checkpoints.rglob("*"))
    csv = bad_checkpoints / "out.csv"
    base = [] if "--profile" in args else ["--profile", "smoke"]
    args = [a.replace("{tmp}", str(bad_checkpoints)) for a in args]
    result = run_cli("estimate", *base, "--samples", "32", *args, "--csv", csv, "--json")
    assert_bad_input(result, *words)
    assert not csv.exists()
    assert sorted(p.name for p in bad_checkpoints.rglob("*")) == before


def steps_on_grid(steps: list[dict]) -> bool:
    return all((s["r"] * 2**SEARCH_DEPTH).is_integer() and 0 < s["r"] <= 1 for s in steps)


def test_search_smoke_converges_on_the_dyadic_grid(run_cli):
    doc = ok_json(run_cli("search", "--profile", "smoke", "--target-flops", "30", "--json"))
    assert doc["converged"] is True and doc["cascade"] is False
    assert abs(doc["estimated_reduction_pct"] - 30) <= 0.25 == doc["tolerance"]
    assert doc["steps"] and steps_on_grid(doc["steps"])
    assert doc["chosen_r"] in [s["r"] for s in doc["steps"]]
    low, high = doc["reachable_pct"]
    assert low < 30 < high
    # bisection: each step halves the interval, so the step sizes are 1/4, 1/8, ...
    moves = [abs(b["r"] - a["r"]) for a, b in zip(doc["steps"], doc["steps"][1:])]
    assert moves == [2.0 ** -(i + 2) for i in range(len(moves))]


def test_search_agrees_with_estimate_at_its_chosen_r(run_cli):
    found = ok_json(run_cli("search", *FAST, "--target-flops", "45", "--json"))
    est = ok_json(run_cli("estimate", *FAST, "--ratios", str(found["chosen_r"]), "--json"))
    assert est["estimates"][0]["flops_reduction_pct"] == pytest.approx(found["estimated_reduction_pct"], rel=1e-9)


@pytest.mark.parametrize("target", ["1", "99.9"])
def test_search_unreachable_target_names_the_range(run_cli, target):
    result = run_cli("search", *FAST, "--target-flops", target, "--json")
    assert_bad_input(result, "reachable range", "%..")


@pytest.mark.parametrize(
    "args, words",
    [
        ((), ("--target-flops is required",)),
        (("--target-flops", "100"), ("--target-flops",)),
        (("--target-flops", "30", "--tolerance", "0"), ("--tolerance",)),
        (("--target-flops", "30", "--model", "nope"), ("unknown model",)),
    ],
)
def test_search_bad_input(run_cli, args, words):
    assert_bad_input(run_cli("search", *FAST, *args, "--json"), *words)


def test_search_cascade_runs(run_cli):
    doc = ok_json(run_cli("search", "--profile", "smoke", "--samples", "32", "--target-flops", "40", "--cascade", "--json"))
    assert doc["cascade"] is True and doc["steps"] and steps_on_grid(doc["steps"])
    assert abs(doc["estimated_reduction_pct"] - 40) <= 0.25 or not doc["converged"]


def test_bisect_ratio_on_a_known_curve():
    curve = lambda r: 80 * (1 - r) + 10  # noqa: E731 - reduction falls linearly from ~90 % to 10 %
    result = bisect_ratio(curve, 50.0, tolerance=0.1)
    assert result.converged and abs(result.estimated_reduction_pct - 50) <= 0.1
    assert result.chosen_r == pytest.approx(0.5, abs=0.1 / 80)
    assert steps_on_grid(result.steps) and len(result.steps) <= SEARCH_DEPTH
    coarse = bisect_ratio(lambda r: 90.0 if r < 0.5 else 10.0, 50.0, tolerance=0.25)  # a step: never within
    assert not coarse.converged and len(coarse.steps) == SEARCH_DEPTH
    with pytest.raises(UnreachableTarget) as info:
        bisect_ratio(curve, 5.0, tolerance=0.25)
    assert (info.value.low, round(info.value.high, 2)) == (10.0, 89.98)
    assert "10.00%..89.98%" in str(info.value)
