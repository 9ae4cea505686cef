"""Latency reports: the documented fields, forced engine choices, and ``ftwt eval --latency`` output."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_engine import noise_images, toy

import ftwt_cli.cli.evaluate  # noqa: F401 - registers `ftwt eval` on the app
from ftwt_cli.core.flops import FlopsCounter
from ftwt_cli.engine import build_engine, folded_dense
from ftwt_cli.engine.latency import latency_report, prepared_engine
from ftwt_cli.io import loading
from ftwt_cli.io.checkpoint import save_checkpoint
from ftwt_cli.io.config import resolve
from ftwt_cli.models import create_model

LAYER_FIELDS = {"name", "block", "sparse", "sparse_us", "dense_us", "keep", "active_in", "macs"}


def test_report_has_the_documented_fields_and_measures_every_layer():
    model = toy("resnet", 32)
    images = noise_images(32, 3)
    report = latency_report(model, images, warmup=2, layout_images=noise_images(32, 2) * 0.5)
    for key in (
        "dense_ms", "engine_ms", "latency_reduction_pct", "flops_reduction_pct", "flops_reduction_no_heads_pct", "ratio",
        "fallback", "sparse_layers", "sparse_layer_count", "conv_layer_count", "layers", "dense_channels_last", "calibration",
    ):  # fmt: skip
        assert key in report, key
    assert len(report["layers"]) == report["conv_layer_count"] == len(model.blocks)
    assert all(LAYER_FIELDS <= set(layer) for layer in report["layers"])
    if report["fallback"]:
        assert report["sparse_layers"] == []
    else:
        assert report["sparse_layers"] == [layer["name"] for layer in report["layers"] if layer["sparse"]]
    assert report["calibration"]["images"] == 2 and report["layout_images"] == "2 separate images"
    # Heads are charged: the reduction in the ratio is below the one without heads.
    assert report["flops_reduction_pct"] < report["flops_reduction_no_heads_pct"]
    assert report["ratio"] == pytest.approx(report["latency_reduction_pct"] / report["flops_reduction_pct"])


@pytest.mark.parametrize("layers, fallback", [("dense", False), ("sparse", False), ("sparse", True)])
def test_forced_choices_are_reported_and_flops_come_from_the_masks_applied(layers, fallback):
    model = toy("depthwise", 32)
    images = noise_images(32, 3)
    report = latency_report(model, images, warmup=1, calibrate=False, layers=layers, fallback=fallback)
    assert report["fallback"] is fallback and report["layers"] == []
    assert report["sparse_layer_count"] == (len(model.blocks) if layers == "sparse" and not fallback else 0)
    with torch.no_grad():
        model(images)
    counter = FlopsCounter(model.graph)
    expected = counter.reduction_pct(counter.macs_from_masks([r.mask for r in model.records()]).mean().item(), with_heads=True)
    assert report["flops_reduction_pct"] == pytest.approx(float(expected), abs=1e-6)


def test_dense_backbone_reports_no_reduction():
    report = latency_report(create_model("smallnet", 10).eval(), noise_images(32, 2), warmup=1, calibrate=False)
    assert report["flops_reduction_pct"] == 0.0 and math.isnan(report["ratio"])


def test_eval_latency_prints_per_layer_times_in_json_and_plots(run_cli, tmp_path):
    cfg = resolve("smoke", test_samples=8)
    torch.manual_seed(0)
    ftwt = loading.wrap(create_model("smallnet", 10), cfg)
    with torch.no_grad():
        for head in ftwt.heads():  # keep the first half of every block's filters
            head.proj.weight.zero_()
            half = head.proj.out_features // 2
            head.proj.bias[:half], head.proj.bias[half:] = 5.0, -5.0
    save_checkpoint(tmp_path / "ftwt.pt", ftwt, loading.ftwt_meta(cfg, 10, 0.9))
    result = run_cli(
        "eval", "--profile", "smoke", "--checkpoint", tmp_path / "ftwt.pt", "--samples", "8",
        "--latency", "--latency-samples", "3", "--json", "--plots", tmp_path / "plots",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    latency = json.loads(result.stdout)["models"][0]["latency"]
    assert len(latency["layers"]) == len(ftwt.blocks) and all(LAYER_FIELDS <= set(layer) for layer in latency["layers"])
    assert latency["layers"][0]["keep"] == pytest.approx(0.5)
    assert "per-layer latency" in result.stderr and "sparse µs" in result.stderr
    assert (tmp_path / "plots" / "layer_latency.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture
def ftwt_checkpoint(tmp_path):
    cfg = resolve("smoke", test_samples=8)
    torch.manual_seed(0)
    ftwt = loading.wrap(create_model("smallnet", 10), cfg)
    path = tmp_path / "ftwt.pt"
    save_checkpoint(path, ftwt, loading.ftwt_meta(cfg, 10, 0.9))
    return path


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--engine-memory-mb", "0"), ("--engine-memory-mb", "> 0")),
        (("--engine-memory-mb", "-4"), ("--engine-memory-mb", "> 0")),
        (("--batch-size", "0"), ("--batch-size", "at least 1")),
        (("--batch-size", "-8"), ("--batch-size", "at least 1")),
    ],
)
def test_bad_engine_memory_and_batch_size_exit_2_in_one_line(run_cli, ftwt_checkpoint, args, words):
    result = run_cli("eval", "--profile", "smoke", "--checkpoint", ftwt_checkpoint, "--latency", *args, "--json")
    assert result.exit_code == 2 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]) and "Traceback" not in result.output
    assert all(word in errors[0] for word in words), errors[0]


def test_eval_latency_batch_size_reports_batched_throughput_and_prototypes(run_cli, ftwt_checkpoint):
    result = run_cli(
        "eval", "--profile", "smoke", "--checkpoint", ftwt_checkpoint, "--samples", "8", "--latency",
        "--latency-samples", "3", "--batch-size", "4", "--engine-memory-mb", "16", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    latency = json.loads(result.stdout)["models"][0]["latency"]
    row = latency["batched"]["4"]
    assert row["dense_images_per_s"] > 0 and row["engine_images_per_s"] > 0 and row["speedup"] > 0
    assert latency["prototypes"]["memory_cap_mb"] == 16 and latency["prototypes"]["fitted_on"] > 0
    use = latency["prototype_use"]
    assert use["memory_mb"] <= 16
    assert use["coverage"] is None or 0 <= use["coverage"] <= 1  # None: the measured choice ran no prototype (dense layers)
    assert "batch 4" in result.stderr and "engine prototypes" in result.stderr


def test_checkpoint_prototypes_are_used_by_eval_latency(run_cli, tmp_path):
    """Prototype sets stored in a checkpoint's meta (plain lists) are the engine's in ``eval --latency``."""
    cfg = resolve("smoke", test_samples=8)
    torch.manual_seed(0)
    ftwt = loading.wrap(create_model("smallnet", 10), cfg).eval().configure(mask_source="predicted")
    lists = build_engine(ftwt, prototype_images=noise_images(32, 4), layers="sparse", fallback=False).prototype_lists()
    assert lists["layers"]
    save_checkpoint(tmp_path / "p.pt", ftwt, {**loading.ftwt_meta(cfg, 10, 0.9), "engine_prototypes": lists})
    result = run_cli("eval", "--profile", "smoke", "--checkpoint", tmp_path / "p.pt", "--samples", "8", "--latency", "--latency-samples", "2", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["models"][0]["latency"]["prototypes"]["source"] == "checkpoint"


def test_report_times_other_models_beside_and_compares_with_the_gated_model():
    model = toy("resnet", 32)
    images = noise_images(32, 4)
    layout = noise_images(32, 3) * 0.5
    engine = prepared_engine(model, (32, 32), layout)
    assert engine.fitted["fitted_on"] == 3  # too few to keep the calibration images apart
    other = folded_dense(model, (32, 32))
    for threads in (1, 2):  # one fitted engine, its choices made again per thread count
        report = latency_report(model, images, threads=threads, warmup=1, layout_images=layout, others={"static": other}, engine=engine)
        assert report["threads"] == threads and report["static_ms"] > 0 and report["static_p90_ms"] >= report["static_ms"]
        assert report["engine_over_static"] == pytest.approx(report["engine_ms"] / report["static_ms"])
        assert report["max_rel_error"] < 1e-5 and report["mask_mismatches"] == 0
        assert report["prototypes"]["fitted_on"] == 3


def test_op_profile_and_the_heads_only_reference():
    """``profile_images`` adds where each timed model's time goes; the heads-only reference (dense convs,
    the heads applying their masks) computes the gated model's outputs."""
    from ftwt_cli.engine.latency import dense_reference

    model = toy("resnet", 32)
    images = noise_images(32, 3)
    heads_only, info = dense_reference(model, (32, 32), images[:2], rounds=1, masked=True)
    with torch.no_grad():
        assert torch.allclose(heads_only(images), model(images), atol=1e-5)
    assert set(info) == {"dense_channels_last", "dense_default_ms", "dense_channels_last_ms"}
    report = latency_report(model, images, warmup=1, calibrate=False, others={"dense_with_heads": heads_only}, profile_images=2)
    assert report["dense_with_heads_ms"] > 0
    profiled = report["op_profile"]
    assert set(profiled) == {"dense", "engine", "dense_with_heads"}
    for name, entry in profiled.items():
        assert entry["images"] == 2 and entry["ms_per_image"] >= sum(op["ms_per_image"] for op in entry["ops"]) > 0
        assert any("conv" in op["op"] for op in entry["ops"]), name
    assert "op_profile" not in latency_report(model, images, warmup=1, calibrate=False)
