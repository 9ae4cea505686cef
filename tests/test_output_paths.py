"""Unwritable or special output paths are refused in one line, exit 2, before any work (issue #26)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftwt_cli.errors import BadInput
from ftwt_cli.io.checkpoint import check_writable

SMOKE = ("--profile", "smoke")
QUICKSTART = Path(__file__).resolve().parents[1] / "profiles" / "checkpoints" / "quickstart-dense.pt"


@pytest.mark.parametrize("path", ["/proc/x", "/sys/ftwt-run", "/dev/shm/../x", "/proc"])
def test_system_folders_are_refused(path):
    with pytest.raises(BadInput, match="system folder"):
        check_writable(path, "--out", folder=True)


def test_a_file_where_a_folder_is_wanted_and_the_reverse(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInput, match="is a file, not a folder"):
        check_writable(tmp_path / "file", "--out", folder=True)
    with pytest.raises(BadInput, match="is a file, not a folder"):
        check_writable(tmp_path / "file" / "run", "--out", folder=True)
    with pytest.raises(BadInput, match="is a folder"):
        check_writable(tmp_path, "--out")
    check_writable(tmp_path / "new" / "deeper", "--out", folder=True)  # creatable: fine, and nothing created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize(
    "command",
    [
        ("train", *SMOKE, "--dense", "--out", "/proc/x"),
        ("train", *SMOKE, "--dense", "--out", "{file}"),
        ("eval", *SMOKE, "--checkpoint", str(QUICKSTART), "--plots", "/proc/plots"),
        ("eval", *SMOKE, "--checkpoint", str(QUICKSTART), "--csv", "/sys/csv"),
        ("estimate", *SMOKE, "--csv", "/proc/x.csv"),
        ("calibrate", str(QUICKSTART), *SMOKE, "--target-flops", "30", "--out", "/sys/calibrated.pt"),
    ],
)
def test_commands_refuse_special_outputs_before_any_work(run_cli, tmp_path, command):
    (tmp_path / "file").write_text("x")
    result = run_cli(*[a.format(file=tmp_path / "file") for a in command])
    assert result.exit_code == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "cannot write" in lines[0] and "Traceback" not in result.stderr
    # refused before any work: nothing but the resolved configuration precedes the error
    assert all(line.startswith(("config:", "error:")) for line in result.stderr.strip().splitlines()), result.stderr
