"""Figures (matplotlib, Agg backend: files only, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ftwt_cli.io.checkpoint import atomic_write_bytes  # noqa: E402


def save_figure(fig, path: str | Path) -> None:
    """Write a figure atomically as PNG and close it."""
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def plot_estimate(est, path: str | Path, target: float | None, chosen_r: float | None, title: str = "") -> None:
    """r → estimated FLOPs reduction (with and without heads), the target and chosen r marked."""
    fig, ax = plt.subplots(figsize=(6, 4))
    reductions = [est.reduction_pct(i) for i in range(len(est.ratios))]
    with_heads = [est.reduction_pct(i, with_heads=True) for i in range(len(est.ratios))]
    ax.plot(est.ratios, reductions, marker="o", ms=3, label="estimated reduction")
    ax.plot(est.ratios, with_heads, ls="--", label="including decision heads")
    if target is not None:
        ax.axhline(target, color="tab:red", lw=1, label=f"target {target:g}%")
    if chosen_r is not None:
        ax.axvline(chosen_r, color="tab:green", lw=1, label=f"chosen r = {chosen_r:.3g}")
    ax.set_xlabel("r (fraction of activation mass kept)")
    ax.set_ylabel("FLOPs reduction (%)")
    ax.set_title(f"{title} estimated FLOPs reduction ({est.samples} images)".strip())
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_brier(reports, perturbation: str, path: str | Path, title: str = "") -> None:
    """Brier score against σ of one perturbation, one line per model (the paper's Table 3 as a figure)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for report in reports:
        points = sorted((p.sigma, p.brier) for p in report.brier if p.perturbation == perturbation)
        ax.plot([s for s, _ in points], [b for _, b in points], marker="o", ms=4, label=report.label)
    ax.set_xlabel(f"{perturbation} σ" + (" (pixels)" if perturbation == "blur" else " (on [0, 1] pixels)"))
    ax.set_ylabel("Brier score (lower is better)")
    ax.set_title(f"{title} Brier score under Gaussian {perturbation}".strip())
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def _per_layer_figure(reports, values, ylabel: str, title: str, log: bool = False):
    """One line per model over the gated layers in execution order; layer names on the axis when few."""
    layers = max(len(r.layers) for r in reports)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * layers + 2), 4.2))
    for report in reports:
        ax.plot(range(len(report.layers)), [values(layer) for layer in report.layers], marker="o", ms=4, label=report.label)
    names = [layer.name for layer in max(reports, key=lambda r: len(r.layers)).layers]
    if layers <= 40:
        ax.set_xticks(range(layers), names, rotation=90, fontsize=7)
    ax.set_xlabel("gated layer (execution order)")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both" if log else "major")
    ax.legend()
    return fig, ax


def plot_layer_pruning(reports, path: str | Path, title: str = "") -> None:
    """Per-layer mean fraction of filters pruned (the paper's Figure 4b)."""
    fig, ax = _per_layer_figure(
        reports, lambda layer: 1.0 - layer.keep_ratio, "mean fraction of filters pruned", f"{title} pruning per layer".strip()
    )
    ax.set_ylim(-0.02, 1.02)
    save_figure(fig, path)


def plot_clusters(reports, path: str | Path, title: str = "") -> None:
    """Distinct masks (clusters) per layer over the test set, log scale (the paper's Figure 4a)."""
    samples = reports[0].samples
    fig, ax = _per_layer_figure(
        reports,
        lambda layer: layer.clusters,
        "distinct masks (clusters)",
        f"{title} distinct masks per layer over {samples} test images".strip(),
        log=True,
    )
    ax.axhline(samples, color="grey", ls=":", lw=1, label=f"{samples} images (every mask unique)")
    ax.set_ylim(0.7, samples * 1.6)
    ax.legend()
    save_figure(fig, path)


def plot_layer_budget(reports, path: str | Path, title: str = "") -> None:
    """Per layer, the fraction of filters the ground truth keeps (target) next to what the heads keep
    (reached): where a missed FLOPs budget went."""
    gated = [r for r in reports if any(layer.target_keep_ratio is not None for layer in r.layers)]
    fig, axes = plt.subplots(len(gated), 1, figsize=(10, 3.2 * len(gated)), squeeze=False)
    for ax, report in zip(axes[:, 0], gated):
        names = [layer.name for layer in report.layers]
        x = range(len(names))
        ax.plot(x, [layer.target_keep_ratio for layer in report.layers], "o-", label="target (ground truth)")
        ax.plot(x, [layer.keep_ratio for layer in report.layers], "s-", label="reached (heads)")
        if len(names) <= 40:
            ax.set_xticks(list(x), names, rotation=90, fontsize=7)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("fraction of filters kept")
        ax.set_title(f"{title} {report.label}: target vs reached keep rate per layer".strip())
        ax.grid(alpha=0.3)
        ax.legend()
    axes[-1, 0].set_xlabel("gated layer (execution order)")
    fig.tight_layout()
    save_figure(fig, path)
