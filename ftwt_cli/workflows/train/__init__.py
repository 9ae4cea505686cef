"""Training: dense baselines, FTWT dynamic training (decoupled or joint), static baselines and predefined
signatures, resumable exactly, single process or DistributedDataParallel under torchrun.

The parts, in the order a run uses them: :mod:`.spec` (what a run is, config.json), :mod:`.kinds`
(one class per run kind), :mod:`.processes` (torchrun, DDP, seeding), :mod:`.objectives` (loss,
optimizers, frozen heads, the step), :mod:`.warmup` (head-only phases), :mod:`.hooks` (the budget
policy), :mod:`.records` (summary and tables) and :mod:`.run` (the epochs).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ftwt_cli.console import console
from ftwt_cli.io import checkpoint as ckpt
from ftwt_cli.io import loading, setting
from ftwt_cli.io.config import Config
from ftwt_cli.workflows.train import kinds
from ftwt_cli.workflows.train.objectives import NonFiniteLoss
from ftwt_cli.workflows.train.processes import Distributed, seed_epoch, start_processes, stop_processes
from ftwt_cli.workflows.train.records import Summary
from ftwt_cli.workflows.train.run import Run
from ftwt_cli.workflows.train.spec import CONFIG_FILE, LAST_FILE, RunSpec, parse_milestones, prepare_dir, read_spec, started

__all__ = ["NonFiniteLoss", "Run", "RunSpec", "Summary", "build_run", "new_spec", "parse_milestones", "read_spec", "resume", "start", "train"]


def new_spec(
    cfg: Config,
    *,
    dense: bool = False,
    init: str | None = None,
    target_flops: float | None = None,
    static: str | None = None,
    signature: str | None = None,
    static_signature: bool = False,
) -> RunSpec:
    """The spec of a new run from the CLI's choices: a dense baseline, a static baseline (``static``), a
    predefined signature (``signature``, routed or with ``static_signature`` pruned), else FTWT."""
    if dense:
        return RunSpec(cfg, "dense", init=init, target_flops=target_flops)
    if static:
        return RunSpec(cfg, "static", init=init, static=kinds.static_record(static, init, target_flops))
    if signature:
        record = kinds.signature_record(cfg, init, signature, target_flops)
        if static_signature:
            return RunSpec(cfg, "static", init=init, static=kinds.static_record("signature", init, None, record))
        return RunSpec(cfg, "signature", init=init, signature=record)
    return RunSpec(cfg, "ftwt", init=init, target_flops=target_flops)


def start(cfg: Config, out: str | None = None, *, dense: bool = False, init: str | None = None, **choices) -> Summary:
    """A new run from the CLI's choices (see :func:`new_spec`), into ``out`` or the default directory.
    ``init`` defaults to the profile's dense weights (its checkpoint, or torchvision's when pretrained)."""
    ckpt.check_writable(out or "runs", "--out", folder=True)  # before any work
    start_from = None if dense else loading.initial_weights(cfg, init)
    cfg = setting.follow(cfg, start_from, "--init")  # the dense weights' data and input size, unless given
    spec = new_spec(cfg, dense=dense, init=start_from, **choices)
    return train(spec, out=out)


def resume(run_dir: str, epochs: int | None = None, **overrides) -> Summary:
    """Continue the run in ``run_dir`` as it was configured (``overrides``: device, workers, data_root,
    download, sync_bn), optionally up to ``epochs``."""
    spec = read_spec(Path(run_dir))
    spec.config = spec.config.override(**overrides)
    ckpt.check_writable(run_dir, "--resume", folder=True)
    if not started(Path(run_dir)) and os.environ.get("RANK", "0") == "0":
        console.print(
            f"{run_dir} stopped before its first checkpoint (config.json, no {LAST_FILE}): starting it from epoch 0 "
            "with its recorded configuration",
            highlight=False, soft_wrap=True,
        )  # fmt: skip
    if epochs is not None:
        spec.with_epochs(epochs)
    return train(spec, resume=run_dir)


def build_run(
    spec: RunSpec, run_dir: Path | None = None, dist: Distributed = Distributed(), device: torch.device = torch.device("cpu"),
    resume: bool = False,
) -> Run:  # fmt: skip
    """The run of ``spec``, built and ready to :meth:`~Run.fit` (nothing is written yet): the kind's
    initial model (or ``run_dir``'s last.pt on resume), the choices it records in the spec, the
    configured model, objective, optimizers and data."""
    kind = kinds.check(spec)
    seed_epoch(spec.config.seed, -1, 0)  # model initialisation (identical on every rank)
    if resume:
        loaded = loading.load_model(spec.config, str(run_dir / LAST_FILE), require=kind.checkpoint_kind)
        loaded.model.to(device)
    else:
        loaded = kind.initial(spec, device)
        loaded.model.to(device)
        kind.prepare(spec, loaded.model, dist, device)
    return Run(spec, kind, kind.configure(spec, loaded), run_dir, dist, device, resume=resume)


def train(spec: RunSpec, out: str | None = None, resume: str | None = None) -> Summary:
    """Train a new run (``spec`` into ``out`` or the default directory) or continue ``resume``.

    Call on every rank under torchrun; only rank 0 writes. With ``resume``, ``spec`` is the run's own
    spec (see :func:`read_spec`) with the wanted epoch count. Everything the spec records (the r of a
    FLOPs budget, the pruned widths of a static baseline) is decided before the run is built, and
    config.json is written once, complete, after the run is built and before its first epoch.
    """
    kinds.check(spec)
    # Checked on every rank before the process group forms (a rendezvous), so no rank sees rank 0's mkdir.
    run_dir = Path(resume) if resume else (prepare_dir(spec, out) if out else None)
    dist, device = start_processes(spec.config.device)
    try:
        # a run stopped before its first checkpoint restarts from epoch 0 in its own folder
        run = build_run(spec, run_dir, dist, device, resume=resume is not None and started(run_dir))
        if dist.is_main:  # only now: every input is checked and nothing is half written on bad input
            # The default name carries r, which a --target-flops search has chosen by now.
            run.run_dir = run.run_dir or prepare_dir(spec, None)
            run.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_json(run.run_dir / CONFIG_FILE, spec.to_dict())
        dist.barrier()
        return run.fit()
    finally:
        stop_processes(dist)
