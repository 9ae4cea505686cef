"""The CLI starts fast: help and --version load neither torch, torchvision nor pandas; help lists the
registries' names from a torch-free copy (checked here against the registries) and shows one spelling per
option, the old spellings still working."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftwt_cli import __version__
from ftwt_cli.cli import app, names

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("profiles", "estimate", "search", "train", "eval", "calibrate", "export", "info")
HEAVY = ("torch", "torchvision", "pandas")
QUICKSTART = ROOT / "profiles" / "checkpoints" / "quickstart-dense.pt"

PROBE = """
import json, sys
from ftwt_cli.cli import main
for args in json.loads(sys.argv[1]):
    sys.argv = ["ftwt", *args]
    try:
        main()
    except SystemExit:
        pass
print(json.dumps(sorted(m for m in {heavy} if m in sys.modules)), file=sys.stderr)
"""


def test_help_and_version_import_neither_torch_nor_pandas():
    calls = [["--help"], ["--version"]] + [[c, "--help"] for c in COMMANDS]
    probe = PROBE.format(heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", probe, json.dumps(calls)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stderr.strip().splitlines()[-1]) == []
    assert done.stdout.count("Usage: ftwt") == 1 + len(COMMANDS)


def test_a_command_still_loads_torch_when_it_runs():
    """The probe above would pass vacuously if it never reached a command; a real one does import torch."""
    probe = PROBE.format(heavy=HEAVY)
    calls = [["eval", "--profile", "smoke", "--checkpoint", "missing.pt"]]
    done = subprocess.run([sys.executable, "-c", probe, json.dumps(calls)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "torch" in json.loads(done.stderr.strip().splitlines()[-1])


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and re.fullmatch(r"ftwt \d+\.\d+\.\d+\S*\n", result.stdout)
    assert result.stdout.split()[1] == __version__  # pyproject and the package agree


def test_help_names_match_the_registries():
    from ftwt_cli.algorithms.static import STATIC_METHODS
    from ftwt_cli.core.graph import GATES
    from ftwt_cli.core.heads import HEADS
    from ftwt_cli.core.targets import TARGETS
    from ftwt_cli.io.config import DEFAULT_PROFILE
    from ftwt_cli.workflows.export import FORMATS

    def builtin(registry):  # entries registered by ftwt itself, not by a test or an extension
        return [n for n, entry in registry.items() if getattr(entry, "__module__", "").startswith("ftwt_cli")]

    assert list(names.HEADS) == builtin(HEADS)
    assert list(names.TARGETS) == builtin(TARGETS)
    assert list(names.GATES) == builtin(GATES)
    assert list(names.STATIC_METHODS) == builtin(STATIC_METHODS)
    assert names.EXPORT_FORMATS == FORMATS
    assert names.DEFAULT_PROFILE == DEFAULT_PROFILE


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_no_bool_type_and_only_canonical_spellings(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "<bool>" not in result.stdout
    assert not re.search(r"--r\b|--init\b", result.stdout)


def test_train_help_lists_the_canonical_options():
    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).stdout
    assert "--checkpoint" in out and "--ratio" in out and "--verbose" in out
    assert "paper" in out and "uniform | taylor" in out and "all | internal" in out and "mass (" in out


@pytest.mark.parametrize(
    ("spelling", "shown"), [(["--init", "x.pt", "--r", "0.9"], "--r"), (["--checkpoint", "x.pt", "--ratio", "0.9"], "--ratio")]
)
def test_both_spellings_parse_and_messages_name_the_one_typed(spelling, shown):
    result = CliRunner().invoke(app, ["train", "--profile", "smoke", *spelling, "--target-flops", "50"])
    assert result.exit_code == 2 and f"either {shown} or --target-flops" in result.stderr


def test_an_option_and_its_old_spelling_together_are_refused():
    result = CliRunner().invoke(app, ["train", "--profile", "smoke", "--ratio", "0.9", "--r", "0.8"])
    assert result.exit_code == 2 and "--r is the old spelling of --ratio" in result.stderr


def test_the_canonical_spellings_reach_the_run(cli_json, tmp_path):
    summary = cli_json(
        "train", "--profile", "smoke", "--checkpoint", QUICKSTART, "--ratio", "0.85", "--epochs", "1", "--samples", "64",
        "--out", tmp_path / "run",
    )  # fmt: skip
    assert summary["r"] == pytest.approx(0.85)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["r"] == pytest.approx(0.85)
