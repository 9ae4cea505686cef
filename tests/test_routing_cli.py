"""Routing from the command line: ``ftwt calibrate --codebook K`` turns a free-mask checkpoint into a
routed one (prototypes carried by the checkpoint), which ``ftwt eval --latency`` runs on the routing
engine exactly; bad K and a codebook that disagrees with its tensors exit 2 in one line."""

from __future__ import annotations

import json

import pytest
import torch

import ftwt_cli.cli.calibrate  # noqa: F401 - registers the commands on the app
import ftwt_cli.cli.evaluate  # noqa: F401
import ftwt_cli.cli.train  # noqa: F401
from ftwt_cli.engine import build_engine
from ftwt_cli.io import loading
from ftwt_cli.io.checkpoint import load_checkpoint, save_checkpoint
from ftwt_cli.io.config import resolve


@pytest.fixture(scope="module")
def free_mask_run(tmp_path_factory, cli_json):
    work = tmp_path_factory.mktemp("routing")
    cli_json("train", "--profile", "smoke", "--dense", "--epochs", "1", "--out", work / "dense")
    cli_json("train", "--profile", "smoke", "--init", work / "dense" / "best.pt", "--r", "0.8", "--epochs", "1", "--out", work / "ftwt")
    return work


@pytest.fixture(scope="module")
def routed(free_mask_run, cli_json):
    out = free_mask_run / "routed.pt"
    record = cli_json("calibrate", free_mask_run / "ftwt" / "last.pt", "--profile", "smoke", "--target-flops", "30", "--codebook", "3", "--out", out)
    return out, record


def test_calibrate_codebook_fits_prototypes_to_a_free_mask_checkpoint(routed):
    out, record = routed
    assert record["k"] == 3 and 1 <= min(record["sizes"]) and max(record["sizes"]) <= 3
    assert abs(record["reached_pct"] - 30) <= 1.0, record  # measured on the held-out images, heads included
    meta = load_checkpoint(out)["meta"]
    assert meta["codebook"] == 3 and meta["codebook_sizes"] == record["sizes"]
    model = loading.load_model(resolve("smoke"), str(out), require="ftwt").model.eval().configure(mask_source="predicted", record=True)
    assert model.codebook_sizes() == record["sizes"]
    engine = build_engine(model)
    assert engine.routed
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
    assert torch.allclose(engine(images), expected, atol=1e-4)
    assert all(torch.equal(a, r.mask.bool()) for a, r in zip(engine.batch_masks(), model.records()))


def test_recalibrating_a_routed_checkpoint_keeps_its_k(routed, cli_json, tmp_path):
    out, _ = routed
    again = cli_json("calibrate", out, "--profile", "smoke", "--target-flops", "25", "--out", tmp_path / "again.pt")
    assert again["k"] == 3 and again["refit"] is True


def test_eval_latency_runs_the_routed_model(routed, cli_json):
    out, _ = routed
    doc = cli_json("eval", "--profile", "smoke", "--checkpoint", out, "--samples", "8", "--latency", "--latency-samples", "3")
    latency = doc["models"][0]["latency"]
    assert latency["engine"] == "routed" and latency["codebook_k"] == 3 and "note" not in latency
    assert latency["max_rel_error"] < 1e-5 and latency["subnet_memory_mb"] > 0


@pytest.mark.parametrize("k", ["0", "-2"])
def test_a_codebook_below_one_exits_2_and_writes_nothing(free_mask_run, run_cli, tmp_path, k):
    out = tmp_path / "never.pt"
    result = run_cli("calibrate", free_mask_run / "ftwt" / "last.pt", "--profile", "smoke", "--target-flops", "30", "--codebook", k, "--out", out)
    assert result.exit_code == 2 and not out.exists() and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--codebook" in errors[0]


def test_a_codebook_that_disagrees_with_its_tensors_exits_2(routed, run_cli, tmp_path):
    out, _ = routed
    payload = load_checkpoint(out)
    meta = dict(payload["meta"], codebook_sizes=[k + 1 for k in payload["meta"]["codebook_sizes"]])
    model = loading.load_model(resolve("smoke"), str(out), require="ftwt").model
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, model, meta)
    result = run_cli("eval", "--profile", "smoke", "--checkpoint", bad, "--samples", "8")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1


def test_a_routed_checkpoint_exports_as_its_routing_program(routed, cli_json, tmp_path):
    import ftwt_cli.cli.export  # noqa: F401 - registers export/info

    out, _ = routed
    file = tmp_path / "routed.ts"
    record = cli_json("export", out, "--format", "torchscript", "--out", file, "--profile", "smoke", "--check-samples", "8")
    assert record["check"]["passed"] is True and record["computes"] == "routed"
    assert record["executed_macs"] < record["dense_macs"]
    model = loading.load_model(resolve("smoke"), str(out), require="ftwt").model.eval().configure(mask_source="predicted")
    program = torch.jit.load(str(file))
    kinds = [m.original_name for m in program.modules()]
    assert "RoutedConv" in kinds and "Conv2d" not in kinds, "no dense conv left: only routed sub-convs"
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        assert (program(x) - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())
        assert (program(x[:1]) - expected[:1]).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())
    assert cli_json("info", file)["computes"] == "routed"
