"""Hooks: policies that act at fixed points of a run without the loop knowing them.

A hook may act when an epoch starts, veto an epoch as ``best.pt``, and act when training ends. The
budget policy of ``--target-flops`` runs is one: it calibrates the heads when they freeze (so the
backbone fine-tunes under the masks it ships with), delivers only epochs trained under those masks, and
recalibrates ``best.pt`` at the end (see :mod:`ftwt_cli.algorithms.calibration`). With ``--codebook K``
it also fits K prototype masks per layer at the freeze, sized to the budget
(:mod:`ftwt_cli.algorithms.codebook`), and at the end re-sizes them instead of recalibrating; with
``--bn-reestimate`` the final masks' BN statistics replace the trained ones.
"""

from __future__ import annotations

import functools

from ftwt_cli.algorithms.bn_stats import reestimate_batchnorm
from ftwt_cli.algorithms.calibration import Calibration, CalibrationError, before_and_after, calibrate
from ftwt_cli.algorithms.codebook import CodebookError, CodebookFit, fit_codebook
from ftwt_cli.algorithms.evaluation import validate
from ftwt_cli.errors import BadInput
from ftwt_cli.io import checkpoint as ckpt
from ftwt_cli.io import loading
from ftwt_cli.io.data import make_loader
from ftwt_cli.workflows.train.processes import broadcast_model
from ftwt_cli.workflows.train.records import calibration_line, layer_rows, write_table
from ftwt_cli.workflows.train.spec import BEST_FILE, LAYERS_FILE


class Hook:
    """Base: does nothing at every point. ``run`` is the :class:`~ftwt_cli.workflows.train.run.Run` calling."""

    def on_epoch_start(self, run, epoch: int) -> None:
        """Before ``epoch`` (0-based) trains."""

    def eligible(self, run, epoch: int) -> bool:
        """Whether ``epoch`` may become best.pt."""
        return True

    def on_fit_end(self, run) -> None:
        """After the last epoch (best.pt and last.pt are written)."""


class BudgetPolicy(Hook):
    """``--target-flops`` with calibration: the delivered best.pt removes the budget's FLOPs, measured."""

    def on_epoch_start(self, run, epoch: int) -> None:
        if epoch == run.spec.freeze_epoch:
            # The heads stop learning here: set their thresholds to the budget now, so the backbone
            # fine-tunes under the masks it will be delivered with (calibrating only at the end would
            # change the masks of a backbone that never saw them).
            calibrate_held_out(run, f"epoch {epoch + 1}, heads frozen")
            if run.spec.config.codebook:
                fit_codebook_held_out(run, f"epoch {epoch + 1}")

    def eligible(self, run, epoch: int) -> bool:
        freeze = run.spec.freeze_epoch
        return not (freeze < run.spec.epochs and epoch < freeze)  # only epochs trained on budget

    def on_fit_end(self, run) -> None:
        run.calibration = calibrate_best(run)


def held_out_images(run):
    """The held-out training images budgets are fitted on (the training split when none are held out)."""
    if run.val_loader is not None:
        return run.val_loader
    cfg = run.spec.config
    run.log("warning: --val-fraction 0: calibrating on training images (none are held out)")
    return make_loader(loading.dataset(cfg, "train"), cfg.batch_size, workers=cfg.workers)


def fit_codebook_held_out(run, when: str) -> CodebookFit:
    """--codebook K: prototype masks per layer fitted (or, with a codebook in place, re-sized) on the
    held-out images so the measured FLOPs reduction is the budget; recorded in every later checkpoint."""
    cfg = run.spec.config
    try:
        fit = fit_codebook(run.model, held_out_images(run), run.device, cfg.codebook, run.spec.target_flops, seed=cfg.seed, show=run.show)
    except CodebookError as exc:
        raise BadInput(str(exc)) from None
    run.dist.sync_buffers(run.model)  # every rank routes among rank 0's prototypes
    run.meta["codebook_sizes"] = fit.sizes
    run.log(
        f"codebook ({when}): {min(fit.sizes)}–{max(fit.sizes)} prototypes per layer (K = {fit.k}), "
        f"τ = {fit.tau:.4f} → {fit.reached_pct:.2f}% FLOPs ↓ on {fit.images} held-out images"
    )
    return fit


def calibrate_held_out(run, when: str) -> Calibration:
    """Calibrate the heads to --target-flops on the held-out training images (never the test split)."""
    images = held_out_images(run)
    try:
        result = calibrate(run.model, images, run.device, run.spec.target_flops, show=run.show)
    except CalibrationError as exc:
        raise BadInput(str(exc)) from None
    run.dist.sync_buffers(run.model)  # every rank applies rank 0's offsets
    run.log(
        f"calibrated ({when}) to {result.target_pct:g}% on {result.images} held-out images: "
        f"{result.raw_pct:.2f}% → {result.reached_pct:.2f}% FLOPs ↓ (per-layer keep rates of r' = {result.ratio:.4f})"
    )
    return result


def deliver(run) -> Calibration | CodebookFit:
    """The last correction before best.pt ships: re-size its codebook, or recalibrate its heads; then,
    with --bn-reestimate, the BN statistics of those final masks."""
    cfg = run.spec.config
    result = fit_codebook_held_out(run, "best.pt") if cfg.codebook else calibrate_held_out(run, "best.pt")
    if cfg.bn_reestimate:
        train_images = make_loader(loading.training_splits(cfg, augment=False)[0], cfg.batch_size, workers=cfg.workers)
        seen = reestimate_batchnorm(run.model, train_images, run.device, show=run.show)
        run.dist.sync_buffers(run.model)
        run.log(f"BN statistics re-estimated under the final masks on {seen} training images")
    return result


def calibrate_best(run) -> dict:
    """Recalibrate best.pt's heads to the budget on held-out training images, report the test split for
    the raw heads (no offsets), as trained, and calibrated, and save the calibrated best.pt (last.pt
    keeps the heads as trained)."""
    if run.dist.is_main and run.run_dir is not None:
        state = ckpt.load_checkpoint(run.run_dir / BEST_FILE)["model"]
        ckpt.load_weights(run.model, state, run.run_dir / BEST_FILE, "best.pt")
    broadcast_model(run.model, run.dist)  # every rank needs best.pt
    test = functools.partial(validate, run.model, run.test_loader, run.device, run.target, run.all_sum, run.show)
    record, raw_stats, stats = before_and_after(run.model, lambda label: test(label=label), lambda: deliver(run))
    record |= {
        "split": "val" if run.val_loader is not None else "train",
        "calibrated_at_freeze": run.spec.freeze_epoch < run.spec.epochs,
        "best_epoch": run.best_epoch,
    }
    epochs = run.spec.epochs
    run.layer_history += layer_rows(epochs, "best-raw", raw_stats) + layer_rows(epochs, "best-calibrated", stats)
    if run.dist.is_main and run.run_dir is not None:
        meta = {**run.meta, "epoch": epochs, "test_top1": record["test_top1_calibrated"], "calibration": record}
        ckpt.save_checkpoint(run.run_dir / BEST_FILE, run.model, meta)
        write_table(run.run_dir / LAYERS_FILE, run.layer_history)
    run.log(calibration_line(record))
    return record
