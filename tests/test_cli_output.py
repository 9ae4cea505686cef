"""What the CLI prints reads whole: messages verbatim (never parsed as rich markup), tables at full
width when stderr is not a terminal, and the configuration only with --verbose."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftwt_cli.cli import app
from ftwt_cli.cli.app import _show_warning
from ftwt_cli.console import console, error_line, plain_table
from ftwt_cli.io import config as config_mod
from ftwt_cli.io.artifact import ONNX_EXTRA
from ftwt_cli.models.zoo import TIMM_EXTRA

PACKAGE = Path(__file__).resolve().parents[1] / "ftwt_cli"
QUICKSTART = config_mod.PROFILE_DIR / "checkpoints" / "quickstart-dense.pt"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def bracketed_bad_input_messages() -> list[str]:
    """Every ``BadInput(...)`` literal in the package with a bracket in it; an f-string's fields become X."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "BadInput" and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    text = arg.value
                elif isinstance(arg, ast.JoinedStr):
                    text = "".join(v.value if isinstance(v, ast.Constant) else "X" for v in arg.values)
                else:
                    continue
                if "[" in text:
                    found.append(text)
    return found


def test_the_source_has_bracketed_messages():
    assert any("[0, 1)" in m for m in bracketed_bad_input_messages())


@pytest.mark.parametrize("message", bracketed_bad_input_messages() + ["pip install 'ftwt[onnx]'", "a [bold]b[/bold] [red]c"])
def test_error_lines_are_printed_verbatim(message, capsys):
    error_line(message)
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_warnings_and_table_cells_are_printed_verbatim(capsys):
    _show_warning(UserWarning("see 'ftwt[timm]' [dim]here[/dim]"), UserWarning, "f.py", 1)
    table = plain_table("[b]head[/b]", title="[i]title[/i]")
    table.add_row("cell [red]x[/red]")
    console.print(table)
    err = capsys.readouterr().err
    for text in ("warning: see 'ftwt[timm]' [dim]here[/dim]", "[b]head[/b]", "[i]title[/i]", "cell [red]x[/red]"):
        assert text in err


def test_the_onnx_extra_is_named_whole(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed: importing it raises ImportError
    result = invoke("export", QUICKSTART, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert result.exit_code == 2
    assert ONNX_EXTRA in result.stderr and "ftwt[onnx]" in ONNX_EXTRA
    assert "Traceback" not in result.output


def test_the_timm_extra_is_named_whole(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    result = invoke("estimate", "--profile", "smoke", "--model", "timm:resnet18")
    assert result.exit_code == 2 and TIMM_EXTRA in result.stderr


def test_a_bracketed_range_in_a_bad_input_message_survives():
    result = invoke("train", "--profile", "smoke", "--dense", "--val-fraction", "1.5")
    assert result.exit_code == 2 and "--val-fraction must be in [0, 1)" in result.stderr


def test_a_long_table_cell_is_whole_in_a_log(monkeypatch, tmp_path):
    """CliRunner's stderr is not a terminal: rich would cut cells at 80 columns (``feat…``)."""
    monkeypatch.delenv("COLUMNS", raising=False)
    description = "a profile whose description is long " + "and longer " * 20 + "[and bracketed] to the end"
    (tmp_path / "long.toml").write_text(f'description = "{description}"\nmodel = "smallnet"\n')
    monkeypatch.setattr(config_mod, "PROFILE_DIR", tmp_path)
    result = invoke("profiles")
    assert result.exit_code == 0, result.stderr
    assert description in result.stderr


def test_the_configuration_is_one_short_line_unless_verbose(tmp_path):
    missing = tmp_path / "missing.pt"
    quiet = invoke("eval", "--profile", "smoke", "--checkpoint", missing)
    lines = quiet.stderr.strip().splitlines()
    assert quiet.exit_code == 2 and len(lines) == 2 and len(lines[0]) < 120 and "test_samples=" not in quiet.stderr
    assert lines[1] == f"error: checkpoint not found: {missing}"
    verbose = invoke("eval", "--profile", "smoke", "--checkpoint", missing, "--verbose")
    assert verbose.exit_code == 2 and "test_samples=128" in verbose.stderr


def test_a_command_warning_is_one_labelled_line():
    result = invoke("estimate", "--profile", "smoke", "--ratios", "1")
    assert result.exit_code == 0 and "warning: no checkpoint" in result.stderr
