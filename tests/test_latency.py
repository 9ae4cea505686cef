"""Latency reports: the documented fields (dense eager, dense pre-packed, the routing engine), FLOPs from
the masks applied, the free-mask note, other models timed beside, and ``ftwt eval --latency``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_engine import noise_images, toy

import ftwt_cli.cli.evaluate  # noqa: F401 - registers `ftwt eval` on the app
from ftwt_cli.core.flops import FlopsCounter
from ftwt_cli.engine import folded_dense
from ftwt_cli.engine.latency import FREE_MASKS, dense_reference, latency_report
from ftwt_cli.io import loading
from ftwt_cli.io.checkpoint import save_checkpoint
from ftwt_cli.io.config import resolve
from ftwt_cli.models import create_model

FIELDS = (
    "dense_ms", "dense_prepacked_ms", "engine_ms", "latency_reduction_pct", "latency_reduction_prepacked_pct",
    "flops_reduction_pct", "flops_reduction_no_heads_pct", "ratio", "ratio_prepacked", "engine", "codebook_k",
    "subconvs", "subnet_memory_mb", "prepacked", "dense_channels_last", "max_rel_error", "mask_mismatches",
)  # fmt: skip


def test_routed_report_has_the_documented_fields_and_flops_from_the_masks():
    model = toy("depthwise", 32, k=4)
    images = noise_images(32, 4)
    report = latency_report(model, images, warmup=1)
    for key in FIELDS:
        assert key in report, key
    assert report["engine"] == "routed" and report["codebook_k"] == 4 and "note" not in report
    assert report["max_rel_error"] < 1e-5 and report["mask_mismatches"] == 0
    with torch.no_grad():
        model(images)
    counter = FlopsCounter(model.graph)
    expected = counter.reduction_pct(counter.macs_from_masks([r.mask for r in model.records()]).mean().item(), with_heads=True)
    assert report["flops_reduction_pct"] == pytest.approx(float(expected), abs=1e-6)
    # Heads are charged: the reduction in the ratio is below the one without heads.
    assert report["flops_reduction_pct"] < report["flops_reduction_no_heads_pct"]
    assert report["ratio"] == pytest.approx(report["latency_reduction_pct"] / report["flops_reduction_pct"])
    assert report["ratio_prepacked"] == pytest.approx(report["latency_reduction_prepacked_pct"] / report["flops_reduction_pct"])


def test_free_masks_are_run_exactly_and_say_how_to_route():
    report = latency_report(toy("resnet", 32, k=None), noise_images(32, 3), warmup=1)
    assert report["engine"] == "masked" and report["codebook_k"] is None
    assert report["note"] == FREE_MASKS and "--codebook" in report["note"]
    assert report["max_rel_error"] < 1e-5 and report["mask_mismatches"] == 0


def test_dense_backbone_reports_no_reduction():
    report = latency_report(create_model("smallnet", 10).eval(), noise_images(32, 2), warmup=1)
    assert report["flops_reduction_pct"] == 0.0 and math.isnan(report["ratio"]) and report["engine"] == "dense"


def test_report_times_other_models_beside_and_batches():
    model = toy("resnet", 32)
    images = noise_images(32, 4)
    other = folded_dense(model, (32, 32))
    report = latency_report(model, images, threads=2, warmup=1, others={"static": other}, batch_sizes=[2])
    assert report["threads"] == 2 and report["static_ms"] > 0 and report["static_p90_ms"] >= report["static_ms"]
    assert report["engine_over_static"] == pytest.approx(report["engine_ms"] / report["static_ms"])
    row = report["batched"]["2"]
    assert row["speedup"] == pytest.approx(row["engine_images_per_s"] / row["dense_images_per_s"])
    assert row["speedup_prepacked"] == pytest.approx(row["engine_images_per_s"] / row["dense_prepacked_images_per_s"])


def test_op_profile_and_the_heads_only_reference():
    """``profile_images`` adds where each timed model's time goes; the heads-only reference (dense convs,
    the heads applying their masks) computes the gated model's outputs."""
    model = toy("resnet", 32)
    images = noise_images(32, 3)
    heads_only, info = dense_reference(model, (32, 32), images[:2], rounds=1, masked=True)
    with torch.no_grad():
        assert torch.allclose(heads_only(images), model(images), atol=1e-5)
    assert set(info) == {"dense_channels_last", "dense_default_ms", "dense_channels_last_ms"}
    report = latency_report(model, images, warmup=1, others={"dense_with_heads": heads_only}, profile_images=2)
    profiled = report["op_profile"]
    assert set(profiled) == {"dense", "dense_prepacked", "engine", "dense_with_heads"}
    for name, entry in profiled.items():
        assert entry["images"] == 2 and entry["ms_per_image"] >= sum(op["ms_per_image"] for op in entry["ops"]) > 0
        assert any("conv" in op["op"] for op in entry["ops"]), name
    assert "op_profile" not in latency_report(model, images, warmup=1)


@pytest.fixture
def ftwt_checkpoint(tmp_path):
    cfg = resolve("smoke", test_samples=8)
    torch.manual_seed(0)
    ftwt = loading.wrap(create_model("smallnet", 10), cfg)
    path = tmp_path / "ftwt.pt"
    save_checkpoint(path, ftwt, loading.ftwt_meta(cfg, 10, 0.9))
    return path


@pytest.mark.parametrize("value", ["0", "-8"])
def test_bad_batch_size_exits_2_in_one_line(run_cli, ftwt_checkpoint, value):
    result = run_cli("eval", "--profile", "smoke", "--checkpoint", ftwt_checkpoint, "--latency", "--batch-size", value, "--json")
    assert result.exit_code == 2 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]) and "Traceback" not in result.output
    assert "--batch-size" in errors[0] and "at least 1" in errors[0], errors[0]


def test_eval_latency_on_free_masks_says_so_and_reports_batches(run_cli, ftwt_checkpoint):
    result = run_cli(
        "eval", "--profile", "smoke", "--checkpoint", ftwt_checkpoint, "--samples", "8", "--latency",
        "--latency-samples", "3", "--batch-size", "4", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    latency = json.loads(result.stdout)["models"][0]["latency"]
    assert latency["engine"] == "masked" and latency["dense_prepacked_ms"] > 0
    row = latency["batched"]["4"]
    assert row["dense_images_per_s"] > 0 and row["engine_images_per_s"] > 0 and row["speedup"] > 0
    said = " ".join(result.stderr.split())  # the console may wrap long lines
    assert "free per-image masks cannot be faster" in said and "ftwt calibrate CHECKPOINT --codebook 4" in said
    assert "batch 4" in said
