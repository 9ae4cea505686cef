"""CLI smoke of the static baselines, signatures and ablation flags on the smoke profile."""

from __future__ import annotations

import json

import pytest
import torch

import ftwt_cli.cli.evaluate  # noqa: F401 - registers the eval command on the app
import ftwt_cli.cli.train  # noqa: F401 - registers the train command on the app
from ftwt_cli.core.graph import analyze
from ftwt_cli.io import loading
from ftwt_cli.io.checkpoint import load_checkpoint, save_checkpoint
from ftwt_cli.io.config import resolve
from ftwt_cli.models import create_model


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "dense.pt"
    torch.manual_seed(0)
    save_checkpoint(path, create_model("smallnet", 10), loading.dense_meta(resolve("smoke"), 10))
    return path


def train(run_cli, *args):
    result = run_cli("train", "--profile", "smoke", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def evaluate(run_cli, checkpoint, *compare):
    extra = [a for path in compare for a in ("--compare", path)]
    result = run_cli("eval", "--profile", "smoke", "--checkpoint", checkpoint, *extra, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["models"]


@pytest.mark.parametrize("method", ["uniform", "taylor"])
def test_static_checkpoint_loads_in_eval_with_reduction_vs_dense(run_cli, tmp_path, dense_ckpt, method):
    args = ["--target-flops", "40", "--init", dense_ckpt, "--out", tmp_path / "run"]
    summary = train(run_cli, "--static", method, *args)
    assert summary["mode"] == "static" and abs(summary["flops_reduction_pct"] - 40) <= 1.0
    meta = load_checkpoint(tmp_path / "run/best.pt")["meta"]
    assert meta["kind"] == "static" and meta["method"] == method and meta["target_flops"] == 40
    assert meta["dense_macs"] == analyze(create_model("smallnet", 10), (32, 32)).dense_macs
    config = json.loads((tmp_path / "run/config.json").read_text())
    assert config["mode"] == "static" and config["static"]["method"] == method
    static_row, dense_row = evaluate(run_cli, tmp_path / "run/best.pt", dense_ckpt)
    assert static_row["label"] == f"static-{method}" and static_row["kind"] == "static"
    assert static_row["flops_reduction_pct"] == pytest.approx(summary["flops_reduction_pct"])
    assert static_row["dense_macs"] == pytest.approx(dense_row["dense_macs"])
    assert dense_row["flops_reduction_pct"] == 0


def test_static_run_resumes(run_cli, tmp_path, dense_ckpt):
    train(run_cli, "--static", "uniform", "--target-flops", "30", "--init", dense_ckpt, "--out", tmp_path / "run")
    result = run_cli("train", "--resume", tmp_path / "run", "--epochs", "2", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["epochs"] == 2
    assert load_checkpoint(tmp_path / "run/last.pt")["meta"]["epoch"] == 2


def test_signature_runs_dynamic_and_static_with_the_same_counts(run_cli, tmp_path, dense_ckpt):
    blocks = analyze(create_model("smallnet", 10), (32, 32)).blocks
    counts = {b.conv: max(1, b.out_channels // 2) for b in blocks}
    (tmp_path / "sig.json").write_text(json.dumps(counts))
    dynamic = train(run_cli, "--signature", tmp_path / "sig.json", "--init", dense_ckpt, "--out", tmp_path / "dyn")
    signature = ["--signature", tmp_path / "sig.json", "--init", dense_ckpt]
    fixed = train(run_cli, *signature, "--static-signature", "--out", tmp_path / "st")
    assert dynamic["mode"] == "decoupled" and fixed["mode"] == "static"
    assert load_checkpoint(tmp_path / "dyn/best.pt")["meta"]["signature"] == counts
    assert load_checkpoint(tmp_path / "st/best.pt")["meta"]["kept_filters"] == counts
    rows = evaluate(run_cli, tmp_path / "dyn/best.pt", tmp_path / "st/best.pt")
    # the heads keep exactly the counts, so both cost the same conv MACs (the static classifier is smaller)
    assert rows[0]["label"].startswith("ftwt signature") and rows[1]["label"] == "static-signature"
    assert rows[0]["flops_reduction_pct"] == pytest.approx(rows[1]["flops_reduction_pct"], abs=0.1)
    (dynamic_row,) = evaluate(run_cli, tmp_path / "dyn/best.pt")
    layers = {row["name"]: row for row in dynamic_row["layers"]}
    for conv, k in counts.items():
        assert layers[conv]["keep_ratio"] * layers[conv]["channels"] == pytest.approx(k)


def test_taylor_signature_is_recorded(run_cli, tmp_path, dense_ckpt):
    train(run_cli, "--signature", "taylor", "--target-flops", "30", "--init", dense_ckpt, "--out", tmp_path / "run")
    signature = json.loads((tmp_path / "run/config.json").read_text())["signature"]
    assert signature["source"] == "taylor" and abs(signature["reduction_pct"] - 30) <= 1.0


def test_ablation_flags_are_recorded_in_the_run_directory(run_cli, tmp_path, dense_ckpt):
    ablation = ["--gt", "topk", "--r", "0.5", "--mode", "joint", "--no-head-softmax"]
    train(run_cli, *ablation, "--init", dense_ckpt, "--out", tmp_path / "run")
    config = json.loads((tmp_path / "run/config.json").read_text())["config"]
    assert (config["target"], config["mode"], config["head_softmax"]) == ("topk", "joint", False)
    (row,) = evaluate(run_cli, tmp_path / "run/best.pt")
    assert "topk" in row["label"] and "joint" in row["label"] and "no-softmax" in row["label"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--static", "uniform", "--r", "0.9", "--target-flops", "40"], "either --r or --target-flops"),
        (["--static", "uniform", "--r", "0.9"], "--r apply to FTWT training"),
        (["--static", "uniform", "--target-flops", "40", "--mode", "joint"], "--mode apply to FTWT training"),
        (["--static", "taylor"], "needs --target-flops"),
        (["--static", "random", "--target-flops", "40"], "--static must be uniform or taylor"),
        (["--static", "uniform", "--target-flops", "40", "--dense"], "--dense trains the plain backbone"),
        (["--static", "uniform", "--target-flops", "40", "--signature", "taylor"], "not both"),
        (["--static-signature"], "add --signature"),
        (["--signature", "taylor"], "needs --target-flops"),
        (["--signature", "taylor", "--target-flops", "40", "--r", "0.9"], "either --r or --target-flops"),
        (["--signature", "{missing}"], "signature file not found"),
        (["--signature", "{bad}"], "not a gated block"),
        (["--gt", "best", "--r", "0.9"], "--gt must be mass or topk"),
        (["--gt", "topk", "--target-flops", "40"], "with --gt topk give --r"),
        (["--static", "uniform", "--target-flops", "99.5"], "lower --target-flops"),
    ],
)
def test_bad_combinations_exit_2_and_write_nothing(run_cli, tmp_path, dense_ckpt, args, message):
    (tmp_path / "bad.json").write_text(json.dumps({"nope": 1}))
    paths = {"missing": tmp_path / "missing.json", "bad": tmp_path / "bad.json"}
    out = tmp_path / "run"
    options = [a.format(**paths) for a in args]
    result = run_cli("train", "--profile", "smoke", "--init", dense_ckpt, *options, "--out", out, "--json")
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == "" and not out.exists()
