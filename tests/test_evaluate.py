"""ftwt eval: Brier, perturbations, mask analysis, reports and the CLI (smallnet, synthetic data)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from PIL import Image

import ftwt_cli.cli.evaluate  # noqa: F401 - registers the eval command on the app
from ftwt_cli.algorithms import evaluation, perturb
from ftwt_cli.core.flops import FlopsCounter
from ftwt_cli.core.graph import analyze
from ftwt_cli.core.masks import DistinctRows, MaskStats
from ftwt_cli.io import loading
from ftwt_cli.io.checkpoint import save_checkpoint
from ftwt_cli.io.config import resolve
from ftwt_cli.io.data import make_loader
from ftwt_cli.models import create_model
from ftwt_cli.workflows import evaluate as ev

QUICK = ["--blur-sigmas", "1.0", "--noise-sigmas", "0,0.1", "--samples", "32"]


@pytest.fixture(scope="module")
def smoke_cfg():
    return resolve("smoke", test_samples=32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, smoke_cfg):
    """A dense smallnet and an FTWT smallnet whose heads keep channels 0..C/2-1 of every block."""
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    dense = create_model("smallnet", 10)
    save_checkpoint(folder / "dense.pt", dense, loading.dense_meta(smoke_cfg, 10))
    ftwt = loading.wrap(create_model("smallnet", 10), smoke_cfg)
    with torch.no_grad():
        for head in ftwt.heads():
            head.proj.weight.zero_()
            half = head.proj.out_features // 2
            head.proj.bias[:half] = 5.0
            head.proj.bias[half:] = -5.0
    meta = loading.ftwt_meta(smoke_cfg, 10, 0.9) | {
        "estimate": {"chosen_r": 0.9, "estimated_reduction_pct": 50.0, "target": 50.0}
    }
    save_checkpoint(folder / "ftwt.pt", ftwt, meta)
    return {"dense": str(folder / "dense.pt"), "ftwt": str(folder / "ftwt.pt"), "folder": folder}


@pytest.fixture
def run_eval(run_cli):
    def invoke(*args):
        result = run_cli("eval", "--profile", "smoke", *args)
        assert "Traceback" not in result.stderr
        return result

    return invoke


def _evaluate(cfg, paths, perturbations=()):
    loaded = [loading.load_model(cfg, p) for p in paths]
    models = [ev.EvaluatedModel.of(m, ev.describe(m.meta), torch.device("cpu")) for m in loaded]
    loader = make_loader(loading.dataset(cfg, "test", normalize=False), 32)
    normalize = perturb.Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return ev.evaluate(models, loader, normalize, torch.device("cpu"), perturbations, seed=cfg.seed)


# --- scores -----------------------------------------------------------------------------------------


def test_brier_on_hand_computed_probabilities():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 1, 2])
    # (0.3² + 0.2² + 0.1²), (0.1² + 0.9² + 0.8²), perfect
    expected = torch.tensor([0.14, 1.46, 0.0])
    assert torch.allclose(evaluation.brier_scores(probs, labels), expected)


def test_score_accumulator_top1_top5_and_brier():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    acc = evaluation.ScoreAccumulator()
    acc.update(logits[:1], torch.tensor([0]))
    acc.update(logits[1:], torch.tensor([1]))
    result = acc.result()
    assert result.samples == 2
    assert result.top1 == pytest.approx(50.0)
    assert result.top5 == pytest.approx(100.0)  # k = min(5, 3 classes)
    assert result.brier == pytest.approx((0.14 + 1.46) / 2, abs=1e-6)


# --- perturbations ----------------------------------------------------------------------------------


def test_noise_with_sigma_zero_equals_clean_input():
    images = torch.rand(4, 3, 8, 8)
    noisy = perturb.Perturbation("noise", 0.0).apply(images, seed=3, batch_index=2)
    assert torch.equal(noisy, images)


def test_blur_and_noise_are_deterministic_under_a_seed():
    images = torch.rand(4, 3, 16, 16)
    noise = perturb.Perturbation("noise", 0.1)
    first, again = noise.apply(images, 7, 0), noise.apply(images, 7, 0)
    assert torch.equal(first, again)
    assert not torch.equal(first, images)
    assert not torch.equal(first, noise.apply(images, 8, 0))  # another seed
    assert not torch.equal(first, noise.apply(images, 7, 1))  # another batch
    assert first.min() >= 0 and first.max() <= 1  # clipped back to [0, 1]
    blur = perturb.Perturbation("blur", 1.09)
    blurred = blur.apply(images, 7, 0)
    assert torch.equal(blurred, blur.apply(images, 99, 5))
    assert blurred.std() < images.std()  # smoothing removes variance


def test_blur_kernel_is_odd_and_covers_three_sigma():
    for sigma in (0.1, 0.5, 1.09, 1.45, 3.0):
        size = perturb.blur_kernel_size(sigma)
        assert size % 2 == 1 and size >= 3 and (size - 1) / 2 >= 3 * sigma


def test_negative_sigma_is_rejected():
    with pytest.raises(ValueError):
        perturb.Perturbation("blur", -0.5)


# --- mask analysis ----------------------------------------------------------------------------------


def test_distinct_rows_counts_constructed_masks_across_batches():
    counter = DistinctRows()
    a = [1, 0, 1, 0, 1, 0, 1, 0, 1]  # 9 channels: the last one lives in the padding byte
    b = [1, 0, 1, 0, 1, 0, 1, 0, 0]  # differs from a only in channel 8
    c = [0] * 9
    counter.add(torch.tensor([a, b, a, a], dtype=torch.bool))
    assert len(counter) == 2
    counter.add(torch.tensor([c, b], dtype=torch.bool))
    assert len(counter) == 3


def test_mask_accumulator_keep_core_clusters_and_head_accuracy(tiny_net):
    counter = FlopsCounter(analyze(tiny_net, (8, 8)))  # two blocks of 4 and 6 channels
    acc = MaskStats(counter, ["conv1", "conv2"])
    m1 = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    m2 = torch.ones(2, 6, dtype=torch.bool)
    truth1 = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)  # agreement 4/4 and 2/4
    acc.update([m1, m2], [truth1, m2])
    first, second = acc.layers()
    assert first.keep_ratio == pytest.approx(0.5)
    assert first.core_fraction == pytest.approx(0.25)  # only channel 0 is kept by both samples
    assert first.clusters == 2 and second.clusters == 1
    assert first.head_accuracy == pytest.approx(0.75)
    assert second.keep_ratio == 1.0 and second.head_accuracy == 1.0
    assert acc.mean_macs == pytest.approx(counter.macs_from_masks([m1, m2]).mean().item())
    assert acc.mean_macs < counter.dense_macs
    # every kept channel is kept by the truth too (precision 1); the truth keeps 6 of 8, the heads 4 of them
    assert first.target_keep_ratio == pytest.approx(0.75)
    assert first.precision == pytest.approx(1.0) and first.recall == pytest.approx(4 / 6)
    assert first.head_bce is None  # no logits given


def test_mask_stats_head_bce_and_reduction_across_processes(tiny_net):
    counter = FlopsCounter(analyze(tiny_net, (8, 8)))
    masks = [torch.tensor([[1, 0, 1, 0]], dtype=torch.bool), torch.ones(1, 6, dtype=torch.bool)]
    logits = [torch.tensor([[2.0, -1.0, 0.5, -3.0]]), torch.full((1, 6), 4.0)]
    stats = MaskStats(counter, ["a", "b"], track_masks=False)
    stats.update(masks, masks, logits)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[0], masks[0].float())
    assert stats.layers()[0].head_bce == pytest.approx(expected.item())
    assert stats.layers()[0].clusters is None  # not tracked
    before = stats.layers()
    stats.reduce(lambda t: t.mul_(2))  # two identical processes: sums double, ratios stay
    assert stats.samples == 2 and stats.layers() == before


# --- library reports --------------------------------------------------------------------------------


def test_dense_checkpoint_reports_zero_reduction_and_one_cluster(smoke_cfg, checkpoints):
    (report,) = _evaluate(smoke_cfg, [checkpoints["dense"]])
    assert report.kind == "dense" and report.samples == 32
    assert report.flops_reduction_pct == pytest.approx(0.0)
    assert report.flops_reduction_with_heads_pct is None and report.estimate is None
    assert all(layer.clusters == 1 and layer.keep_ratio == 1.0 for layer in report.layers)
    assert len(report.layers) == 4


def test_ftwt_checkpoint_measures_the_masks_it_applies(smoke_cfg, checkpoints):
    (report,) = _evaluate(smoke_cfg, [checkpoints["ftwt"]])
    # The heads keep the first half of every block: a fixed mask, hence one cluster and all kept = core.
    assert all(layer.keep_ratio == 0.5 and layer.clusters == 1 for layer in report.layers)
    assert all(layer.core_fraction == 0.5 for layer in report.layers)
    assert all(0.0 <= layer.head_accuracy <= 1.0 for layer in report.layers)
    assert 40.0 < report.flops_reduction_pct < 100.0
    assert report.flops_reduction_with_heads_pct < report.flops_reduction_pct
    assert report.estimate["estimated_reduction_pct"] == 50.0
    assert report.estimate["reached_reduction_pct"] == pytest.approx(report.flops_reduction_pct)


def test_compared_models_see_identical_perturbed_inputs(smoke_cfg, checkpoints):
    grid = perturb.perturbation_grid([0.9], [0.0, 0.2])
    first, second = _evaluate(smoke_cfg, [checkpoints["ftwt"], checkpoints["ftwt"]], grid)
    assert [(p.perturbation, p.sigma) for p in first.brier] == [("blur", 0.9), ("noise", 0.0), ("noise", 0.2)]
    assert [p.brier for p in first.brier] == [p.brier for p in second.brier]
    assert first.brier[1].brier == first.brier_clean  # σ = 0 is the clean pass
    assert first.brier[2].brier != first.brier_clean


def test_estimate_vs_reached_needs_a_recorded_estimate():
    assert ev.estimate_vs_reached({}, 40.0, 39.5) is None
    row = ev.estimate_vs_reached({"estimate": {"chosen_r": 0.9, "estimated_reduction_pct": 45.0, "target": 45}}, 40.0, 39.5)
    # the difference is to the target, heads' cost included: what the user asked for
    assert row["difference_pct"] == pytest.approx(-5.5) and row["chosen_r"] == 0.9 and row["calibrated"] is False
    calibrated = ev.estimate_vs_reached({"calibration": {"target_pct": 40.0}}, 40.3, 40.1)
    assert calibrated["calibrated"] and calibrated["target"] == 40.0 and calibrated["estimated_reduction_pct"] is None


# --- CLI --------------------------------------------------------------------------------------------


def test_cli_smoke_json_schema(run_eval, checkpoints):
    result = run_eval("--checkpoint", checkpoints["ftwt"], "--compare", checkpoints["dense"], "--brier-noise", *QUICK, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["samples"] == 32 and doc["perturbations"] == {"blur": [1.0], "noise": [0.0, 0.1]}
    ftwt, dense = doc["models"]
    for model in (ftwt, dense):
        assert {"label", "checkpoint", "kind", "top1", "top5", "flops_reduction_pct", "layers", "brier"} <= set(model)
        assert [set(p) for p in model["brier"]] == [{"perturbation", "sigma", "brier", "top1"}] * 3
        assert {"name", "channels", "keep_ratio", "target_keep_ratio", "head_accuracy", "precision", "recall", "head_bce",
                "clusters", "core_fraction"} == set(model["layers"][0])
    assert ftwt["kind"] == "ftwt" and ftwt["estimate"]["reached_reduction_pct"] == ftwt["flops_reduction_pct"]
    assert dense["flops_reduction_pct"] == 0.0 and dense["layers"][0]["head_accuracy"] is None


def test_cli_writes_csv_tables_and_plots(run_eval, checkpoints, tmp_path):
    result = run_eval(
        "--checkpoint", checkpoints["ftwt"], "--compare", checkpoints["dense"], *QUICK,
        "--csv", tmp_path / "csv", "--plots", tmp_path / "plots",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""  # no --json: nothing on stdout
    summary = pd.read_csv(tmp_path / "csv" / "summary.csv")
    assert list(summary["model"]) == ["ftwt r=0.9", "dense"]
    noise = pd.read_csv(tmp_path / "csv" / "brier_noise.csv")
    assert list(noise["sigma"]) == [0.0, 0.1] and "dense brier" in noise.columns
    assert {p.name for p in (tmp_path / "csv").iterdir()} == {
        "summary.csv", "layers.csv", "estimate.csv", "brier_blur.csv", "brier_noise.csv"
    }  # fmt: skip
    for name in ("brier_blur", "brier_noise", "layer_pruning", "clusters"):
        assert (tmp_path / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_latency_hook(run_eval, checkpoints, monkeypatch):
    calls = []

    def fake_report(model, images, threads, **engine_options):
        calls.append((type(model).__name__, tuple(images.shape), threads, model.training))
        assert engine_options["batch_sizes"] == ()  # no --batch-size given: batch 1 only
        return {"samples": len(images), "threads": threads, "dense_ms": 2.0, "engine_ms": 1.0}

    monkeypatch.setattr(ev, "latency_report", fake_report)
    result = run_eval(
        "--checkpoint", checkpoints["ftwt"], "--samples", "32",
        "--latency", "--latency-samples", "5", "--threads", "2", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert calls == [("FTWTModel", (5, 3, 32, 32), 2, False)]
    assert json.loads(result.stdout)["models"][0]["latency"]["engine_ms"] == 1.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--noise-sigmas", "0,-0.1"], "--noise-sigmas: σ must be >= 0"),
        (["--blur-sigmas", "wide"], "--blur-sigmas must be a comma list"),
        (["--latency", "--threads", "0"], "--threads must be at least 1"),
    ],
)
def test_cli_rejects_bad_options(run_eval, checkpoints, args, message):
    result = run_eval("--checkpoint", checkpoints["ftwt"], *args)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_rejects_checkpoint_of_another_architecture(run_eval, checkpoints, smoke_cfg):
    other = checkpoints["folder"] / "resnet20.pt"
    cfg = resolve("smoke", model="resnet20")
    save_checkpoint(other, create_model("resnet20", 10), loading.dense_meta(cfg, 10))
    result = run_eval("--checkpoint", checkpoints["dense"], "--compare", other, "--json")
    assert result.exit_code == 2 and result.stdout == ""
    assert "is for model 'resnet20'" in result.stderr.splitlines()[-1]


def test_cli_rejects_truncated_checkpoint(run_eval, checkpoints, tmp_path):
    data = open(checkpoints["ftwt"], "rb").read()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(data[: len(data) // 2])
    result = run_eval("--checkpoint", broken, "--csv", tmp_path / "out")
    assert result.exit_code == 2 and "cannot read checkpoint" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing half written


@pytest.mark.parametrize("workers", ["0", "1"])
def test_cli_names_an_image_that_fails_to_decode(run_eval, tmp_path, workers):
    for split in ("train", "test"):
        for label in ("a", "b"):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            Image.new("RGB", (32, 32), (200, 10, 10) if label == "a" else (10, 10, 200)).save(folder / "0.png")
    (tmp_path / "images" / "test" / "b" / "1.png").write_bytes(b"not a png")
    data = f"imagefolder:{tmp_path / 'images'}"
    cfg = resolve("smoke", data=data)
    save_checkpoint(tmp_path / "dense.pt", create_model("smallnet", 2), loading.dense_meta(cfg, 2))
    result = run_eval("--checkpoint", tmp_path / "dense.pt", "--data", data, "--workers", workers)
    assert result.exit_code == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot decode image") and "1.png" in last


def test_labels_of_compared_checkpoints_are_unique():
    labels = ["dense", "ftwt r=0.9", "ftwt r=0.9"]
    assert ev.unique_labels(labels, ["d/best.pt", "soft/best.pt", "nosoft/best.pt"]) == [
        "dense", "ftwt r=0.9 (soft/best.pt)", "ftwt r=0.9 (nosoft/best.pt)"
    ]  # fmt: skip
    assert ev.unique_labels(["dense", "dense"], ["d/best.pt", "d/best.pt"]) == ["dense (d/best.pt)", "dense (d/best.pt) #2"]
