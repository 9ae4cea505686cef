"""A misspelt model or profile name is refused in one line with the nearest names, and nothing warns
before it (issue #26)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    "args, suggestion",
    [
        (("estimate", "--model", "resnet2O"), "did you mean resnet20"),
        (("train", "--dense", "--model", "resnet2O", "--epochs", "1"), "did you mean resnet20"),
        (("estimate", "--profile", "smok"), "did you mean smoke?"),
        (("eval", "--profile", "quickstrat", "--checkpoint", "x.pt"), "did you mean quickstart?"),
    ],
)
def test_misspelt_names_are_refused_with_the_nearest(run_cli, tmp_path, monkeypatch, args, suggestion):
    monkeypatch.chdir(tmp_path)
    result = run_cli(*args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and suggestion in lines[0], result.stderr
    assert "warning" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_names_far_from_any_get_no_suggestion(run_cli):
    result = run_cli("estimate", "--model", "qqqqqq")
    assert result.exit_code == 2 and "did you mean" not in result.stderr and "known: smallnet" in result.stderr
