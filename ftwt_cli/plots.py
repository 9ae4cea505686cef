"""Figures (matplotlib, Agg backend: files only, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ftwt_cli.checkpoint import atomic_write_bytes  # noqa: E402


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
