"""``ftwt export`` and ``ftwt info`` through the real CLI: every format round-trips within 1e-5 of the model
``ftwt eval`` builds, dense and static checkpoints export too, the static core computes what the gated
model computes with its masks fixed (and its FLOPs are its masks' FLOPs), every kind of file describes
itself, and bad input exits 2 with one line and writes nothing."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
import torch
from typer.testing import CliRunner

from ftwt_cli.algorithms.static import CoreSpec, forced_reference
from ftwt_cli.core.flops import FlopsCounter
from ftwt_cli.io import loading
from ftwt_cli.io.config import resolve

SMOKE = ("--profile", "smoke")


def invoke(*args):
    from ftwt_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args) -> dict:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A dense run, an FTWT run from it calibrated to 25 % FLOPs, and a static (uniform) run."""
    w = tmp_path_factory.mktemp("export")
    ok("train", *SMOKE, "--dense", "--epochs", "1", "--out", w / "dense")
    ok("train", *SMOKE, "--init", w / "dense/best.pt", "--r", "0.9", "--epochs", "1", "--out", w / "ftwt")
    ok("calibrate", w / "ftwt/best.pt", *SMOKE, "--target-flops", "25", "--out", w / "calibrated.pt")
    ok("train", *SMOKE, "--init", w / "dense/best.pt", "--static", "uniform", "--target-flops", "30", "--epochs", "1",
       "--out", w / "static")  # fmt: skip
    return w


def images(n: int = 8) -> torch.Tensor:
    return loading.first_test_images(resolve("smoke"), n)


def eval_model(path):
    """The model ``ftwt eval`` builds from ``path`` (eval mode, masks predicted)."""
    model = loading.load_model(resolve("smoke"), str(path)).model.eval()
    if hasattr(model, "configure"):
        model.configure(mask_source="predicted", record=False)
    return model


def run_file(path, fmt: str, x: torch.Tensor) -> torch.Tensor:
    if fmt == "torchscript":
        return torch.jit.load(str(path))(x)
    if fmt == "pt2":
        return torch.export.load(str(path)).module()(x)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "pt2"])
def test_calibrated_ftwt_model_round_trips_within_1e5(runs, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnx")
    out = runs / f"model.{fmt}"
    record = ok("export", runs / "calibrated.pt", "--format", fmt, "--out", out, *SMOKE, "--check-samples", "8")
    assert record["check"]["passed"] is True and record["check"]["max_abs_diff"] <= 1e-5
    x = images(5)  # another batch size than the check's: the batch dimension is dynamic
    with torch.no_grad():
        got, expected = run_file(out, fmt, x), eval_model(runs / "calibrated.pt")(x)
    assert (got - expected).abs().max().item() <= 1e-5
    described = ok("info", out)
    assert described["format"] == fmt and described["kind"] == "ftwt" and described["model"] == "smallnet"
    assert described["calibration"]["target_pct"] == 25
    assert described["check"]["max_abs_diff"] == record["check"]["max_abs_diff"]
    offsets = described["offsets"]
    assert len(offsets) == 4 and any(v != 0 for block in offsets.values() for v in block)  # the calibrated offsets
    assert described["normalization"]["mean"] and len(described["class_names"]) == 10
    # The file computes every filter and says so, with the MACs it executes (heads included).
    assert record["computes"] == described["computes"] == "masked" and "every filter is computed" in described["computes_note"]
    assert record["executed_macs"] > record["dense_macs"] == described["dense_macs"]


@pytest.mark.parametrize("run", ["dense/best.pt", "static/best.pt"])
def test_dense_and_static_checkpoints_export(runs, run):
    out = runs / f"{run.split('/')[0]}.ts"
    record = ok("export", runs / run, "--format", "torchscript", "--out", out, *SMOKE)
    assert record["check"]["passed"] is True
    x = images(3)
    with torch.no_grad():
        assert (run_file(out, "torchscript", x) - eval_model(runs / run)(x)).abs().max().item() <= 1e-5
    described = ok("info", out)
    assert described["kind"] == ("dense" if run.startswith("dense") else "static")
    assert described["computes"] == described["kind"] and record["executed_macs"] == described["executed_macs"] > 0
    if run.startswith("static"):
        assert record["executed_macs"] < record["dense_macs"]


def test_static_core_is_the_gated_model_with_fixed_masks(runs):
    out = runs / "core.pt"
    record = ok("export", runs / "calibrated.pt", "--static-core", "--min-keep-rate", "0.05", "--format", "checkpoint",
                "--out", out, *SMOKE)  # fmt: skip
    figures = record["static_core"]
    assert figures["removed_filters"] > 0 and figures["core_dense_macs"] < figures["dense_macs"]
    assert figures["core_vs_fixed_masks_max_abs_diff"] <= 1e-5
    gated = eval_model(runs / "calibrated.pt")
    core = eval_model(out)
    spec = CoreSpec.from_meta(torch.load(out, weights_only=True)["meta"]["static_core"])
    reference = forced_reference(gated, spec)
    x = images(16)
    with torch.no_grad():
        core.configure(record=True)
        reference.configure(record=True)
        assert (core(x) - reference(x)).abs().max().item() <= 1e-5
        core_macs = FlopsCounter(core.graph).macs_from_masks([r.mask for r in core.records()])
        mask_macs = FlopsCounter(reference.graph).macs_from_masks([r.mask for r in reference.records()])
    # The classifier counts every input in the masks' accounting; the core no longer has the removed ones.
    saved = sum((a.in_features - b.in_features) * a.out_features for a, b in zip(reference.graph.linears, core.graph.linears))
    assert torch.equal(core_macs, mask_macs - saved)
    assert figures["core"]["mean_macs"] <= figures["gated"]["mean_macs"]
    # What each computes: the core every filter it kept (more than its masks count), the gated model every filter.
    assert figures["core"]["mean_macs"] < figures["core"]["executed_macs"] < figures["gated"]["executed_macs"]
    assert record["computes"] == "static core" and figures["latency_threads"] == 1
    described = ok("info", out)
    assert described["static_core"]["kept"] == spec.kept and described["core_figures"]["removed_filters"] > 0
    report = ok("eval", *SMOKE, "--checkpoint", out)["models"][0]
    assert report["kind"] == "ftwt" and report["dense_macs"] == figures["dense_macs"]


def test_info_describes_every_kind_of_file(runs, tmp_path):
    dense = ok("info", runs / "dense/best.pt")
    assert dense["kind"] == "dense" and dense["input_size"] == [32, 32] and dense["ftwt_version"]
    ftwt = ok("info", runs / "ftwt/best.pt")
    assert ftwt["kind"] == "ftwt" and ftwt["head"]["head"] == "paper" and ftwt["calibration"] is None
    assert ok("info", runs / "ftwt/last.pt")["resumable"] is True
    assert ok("info", runs / "static/best.pt")["pruning_history"]
    torch.save(eval_model(runs / "dense/best.pt").state_dict(), tmp_path / "plain.pt")
    plain = ok("info", tmp_path / "plain.pt")
    assert plain["format"] == "state_dict" and plain["tensors"] > 0


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(("config:", "warning:"))]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def test_bad_export_input_exits_2_with_one_line_and_writes_nothing(runs, tmp_path):
    out = tmp_path / "x.ts"
    assert "--format must be one of" in one_line_error(invoke("export", runs / "calibrated.pt", "--format", "tflite", "--out", out))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert "is a file" in one_line_error(invoke("export", runs / "calibrated.pt", "--out", blocker / "x.ts"))
    corrupt = tmp_path / "corrupt.pt"
    good = (runs / "calibrated.pt").read_bytes()
    corrupt.write_bytes(good[: len(good) // 2])
    assert "corrupt" in one_line_error(invoke("export", corrupt, "--out", out))
    assert "corrupt" in one_line_error(invoke("info", corrupt))
    noise = tmp_path / "noise.onnx"
    noise.write_bytes(bytes(range(256)) * 4)
    one_line_error(invoke("info", noise))
    assert "--static-core needs an FTWT checkpoint" in one_line_error(
        invoke("export", runs / "dense/best.pt", "--static-core", "--out", out)
    )
    assert not out.exists() and not list(tmp_path.glob(".x.ts.*"))


def test_exported_archives_hold_their_description_as_plain_json(runs):
    out = runs / "model.torchscript"
    if not out.exists():
        ok("export", runs / "calibrated.pt", "--format", "torchscript", "--out", out, *SMOKE)
    with zipfile.ZipFile(out) as archive:
        name = next(n for n in archive.namelist() if n.endswith("extra/ftwt.json"))
        doc = json.load(io.BytesIO(archive.read(name)))
    assert doc["model"] == "smallnet" and doc["input"]["shape"] == ["batch", 3, 32, 32]
