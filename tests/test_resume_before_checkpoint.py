"""A run stopped before its first checkpoint (config.json, no last.pt) restarts from epoch 0 with its
recorded configuration under --resume (issue #26)."""

from __future__ import annotations

import json

import torch

from ftwt_cli.workflows.train.run import Run

SMOKE = ("--profile", "smoke")


def test_resume_restarts_a_run_stopped_before_its_first_checkpoint(run_cli, tmp_path, monkeypatch):
    straight = run_cli("train", *SMOKE, "--dense", "--seed", "3", "--out", tmp_path / "straight")
    assert straight.exit_code == 0, straight.stderr

    def killed(self):
        raise KeyboardInterrupt  # as a run killed during its first epoch

    with monkeypatch.context() as patch:
        patch.setattr(Run, "fit", killed)
        stopped = run_cli("train", *SMOKE, "--dense", "--seed", "3", "--out", tmp_path / "stopped")
    assert stopped.exit_code == 130
    assert sorted(p.name for p in (tmp_path / "stopped").iterdir()) == ["config.json"]

    again = run_cli("train", *SMOKE, "--dense", "--out", tmp_path / "stopped")
    assert again.exit_code == 2 and "--resume" in again.stderr

    resumed = run_cli("train", "--resume", tmp_path / "stopped", "--json")
    assert resumed.exit_code == 0, resumed.stderr
    assert "starting it from epoch 0 with its recorded configuration" in resumed.stderr
    assert json.loads(resumed.stdout)["epochs"] == 1
    recorded = json.loads((tmp_path / "stopped" / "config.json").read_text())["config"]
    assert recorded["seed"] == 3
    # the restarted run is the run it would have been
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_folder_without_config_is_still_not_a_run(run_cli, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("train", "--resume", tmp_path / "empty")
    assert result.exit_code == 2 and "not an ftwt run directory" in result.stderr
