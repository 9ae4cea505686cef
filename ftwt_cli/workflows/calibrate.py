"""``ftwt calibrate``: calibrate an FTWT checkpoint to a FLOPs budget on the training images its run held
out (the same seeded split, read from the checkpoint's record) and save it; the test split is reported
before and after, never used to choose."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ftwt_cli.algorithms.calibration import Calibration, CalibrationError, before_and_after, calibrate
from ftwt_cli.algorithms.codebook import CodebookError, CodebookFit, fit_codebook
from ftwt_cli.algorithms.evaluation import validate
from ftwt_cli.console import progress_bar
from ftwt_cli.errors import BadInput
from ftwt_cli.io import checkpoint as ckpt
from ftwt_cli.io import loading, setting
from ftwt_cli.io.config import Config, check_target_flops, resolve_device
from ftwt_cli.io.data import make_loader

#: Checkpoint meta fields that say which training images the run held out.
HELD_OUT_FIELDS = ("samples", "train_samples", "val_fraction", "seed")


def default_output(checkpoint: str) -> Path:
    """``NAME-calibrated.pt`` beside the checkpoint."""
    source = Path(checkpoint)
    return source.with_name(f"{source.stem}-calibrated{source.suffix}")


def calibrate_checkpoint(
    cfg: Config, checkpoint: str, target_pct: float, out: str | None, show: Callable = progress_bar, codebook: int | None = None
) -> dict:
    """Calibrate ``checkpoint`` to remove ``target_pct`` % of the FLOPs (heads included), save it to ``out``
    (default: :func:`default_output`) and return the calibration record with the path.

    With ``codebook`` K, the model is made to route: a free-mask model (or one with another K) has its
    heads calibrated to the budget first, then K prototype masks per layer fitted to what they decide
    and sized to the budget (:func:`~ftwt_cli.algorithms.codebook.fit_codebook`); a model with K
    prototypes already is re-sized, its groups kept."""
    check_target_flops(target_pct)  # before anything is loaded
    if codebook is not None and codebook < 1:
        raise BadInput(f"--codebook K needs at least 1 prototype per layer, got {codebook}")
    if not Path(checkpoint).is_file():
        raise BadInput(f"checkpoint {checkpoint} does not exist")
    destination = Path(out) if out else default_output(checkpoint)
    if destination.is_dir():
        raise BadInput(f"--out {destination} is a folder; give a file name")
    ckpt.check_writable(destination, "--out")
    cfg = setting.follow(cfg, checkpoint)
    loaded = loading.load_model(cfg, checkpoint, require="ftwt")
    meta = loaded.meta
    device = resolve_device(cfg.device)
    model = loaded.model.to(device)
    target = loaded.target()
    model.configure(mask_source="predicted", record=True, target=target)
    held_cfg = cfg.override(**{k: meta[k] for k in HELD_OUT_FIELDS if k in meta})
    held = loading.training_splits(held_cfg, augment=False)[1]
    split = "val"
    if held is None:
        held, split = loading.dataset(held_cfg, "train"), "train"
    test_loader = make_loader(loading.dataset(cfg, "test"), cfg.batch_size, workers=cfg.workers)
    held_loader = make_loader(held, cfg.batch_size, workers=cfg.workers)

    sizes = model.codebook_sizes()
    k_now = int(meta.get("codebook") or max(sizes)) if any(sizes) else None
    k = codebook or k_now

    def run() -> Calibration | CodebookFit:
        try:
            if k is not None and k != k_now:  # routing fitted anew: to the masks of heads calibrated to the budget
                model.set_codebooks([None] * len(model.blocks))
                calibrate(model, held_loader, device, target_pct, show=show)
                return fit_codebook(model, held_loader, device, k, target_pct, seed=cfg.seed, show=show)
            if k is not None:  # a codebook model: re-size its prototypes (its groups kept) instead
                return fit_codebook(model, held_loader, device, k, target_pct, seed=cfg.seed, show=show)
            return calibrate(model, held_loader, device, target_pct, show=show)
        except (CalibrationError, CodebookError) as exc:
            raise BadInput(str(exc)) from None

    record, _, _ = before_and_after(model, lambda label: validate(model, test_loader, device, target, show=show, label=label), run)
    record["split"] = split
    routing = {"codebook": k, "codebook_sizes": model.codebook_sizes()} if k is not None else {}
    ckpt.save_checkpoint(destination, model, {**meta, **routing, "calibration": record})
    return {"path": str(destination), **record}
