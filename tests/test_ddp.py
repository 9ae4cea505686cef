"""ftwt train under torchrun: two CPU processes (gloo) on the smoke profile end with identical weights,
one run directory and one JSON document."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

from ftwt_cli.io import loading
from ftwt_cli.io.checkpoint import save_checkpoint
from ftwt_cli.io.config import resolve
from ftwt_cli.models import create_model

# Runs the real CLI entry point on every rank; after training each rank dumps the weights it ended with.
LAUNCHER = textwrap.dedent(
    """
    import os, sys
    import torch
    from ftwt_cli.workflows import train as training

    finish = training.Run.fit

    def fit_and_dump(self):
        summary = finish(self)
        torch.save(self.model.state_dict(), os.path.join(os.environ["DUMP_DIR"], f"rank{self.dist.rank}.pt"))
        return summary

    training.Run.fit = fit_and_dump
    from ftwt_cli.cli import main

    sys.argv = ["ftwt", *sys.argv[1:]]
    main()
    """
)


def test_two_processes_end_identical_with_one_run_directory(tmp_path):
    cfg = resolve("smoke")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "dense.pt", create_model("smallnet", 10), loading.dense_meta(cfg, 10))
    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER)
    env = {**os.environ, "DUMP_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
        "train", "--profile", "smoke", "--init", "dense.pt", "--target-flops", "30", "--epochs", "2", "--freeze-heads-after", "0.5",
        "--device", "cpu", "--json",
    ]  # fmt: skip  (FTWT decoupled: in epoch 2 the frozen heads get only zero gradients, which DDP must accept;
    #   --target-flops: r is searched on rank 0, calibration runs when the heads freeze and for best.pt)
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    summary = json.loads(done.stdout)  # exactly one document: only rank 0 prints
    runs = list((tmp_path / "runs").iterdir())  # the default name, chosen by rank 0 alone
    assert len(runs) == 1 and summary["run_dir"] == f"runs/{runs[0].name}"
    assert sorted(p.name for p in runs[0].iterdir()) == ["best.pt", "config.json", "last.pt", "layers.csv", "metrics.csv"]

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # the calibrated best.pt on both ranks
    assert summary["calibration"]["target_pct"] == 30.0
    saved = torch.load(runs[0] / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], rank0[k]) for k in rank0)
    # metrics are reduced over both shards: every test image counted once
    assert 0.0 <= summary["test_top1"] <= 100.0 and summary["epochs"] == 2 and summary["mode"] == "decoupled"
