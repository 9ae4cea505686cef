"""Profiles and the quickstart checkpoint ship inside the package and are found from any folder.
(.ci/run also builds the wheel, installs it into a fresh venv and runs the quickstart there.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import ftwt_cli
from ftwt_cli.io import config as config_mod

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

PACKAGE = Path(ftwt_cli.__file__).resolve().parent
REPO = PACKAGE.parent


SETUPTOOLS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_profile_file_is_declared_package_data():
    """One copy of the recipes, at the top level, mapped into the wheel as ftwt_cli/profiles/."""
    assert SETUPTOOLS["package-dir"]["ftwt_cli.profiles"] == "profiles" and "ftwt_cli.profiles" in SETUPTOOLS["packages"]
    globs = SETUPTOOLS["package-data"]["ftwt_cli.profiles"]
    shipped = [p.relative_to(REPO / "profiles").as_posix() for p in (REPO / "profiles").rglob("*") if p.is_file()]
    assert "quickstart.toml" in shipped and "checkpoints/quickstart-dense.pt" in shipped
    assert all(any(fnmatch(path, g) for g in globs) for path in shipped), shipped
    assert not (PACKAGE / "profiles").exists()  # no second copy inside the source package


def test_the_package_list_is_every_package_of_the_source_tree():
    found = {".".join(p.parent.relative_to(REPO).parts) for p in PACKAGE.rglob("__init__.py")}
    assert set(SETUPTOOLS["packages"]) == found | {"ftwt_cli.profiles"}


def test_profiles_are_found_and_listed_with_their_files(tmp_path):
    assert config_mod.PROFILE_DIR.resolve() == REPO / "profiles" or "FTWT_PROFILES" in os.environ
    assert Path(config_mod.resolve("quickstart").checkpoint).is_file()
    done = _ftwt("profiles", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    assert all(Path(row["path"]).is_file() and Path(row["path"]).stem == row["name"] for row in rows)


def _ftwt(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "ftwt_cli", *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)


def test_quickstart_runs_from_an_empty_folder_and_writes_nothing_there(tmp_path):
    done = _ftwt("estimate", "--target-flops", "50", "--samples", "256", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout)
    assert Path(doc["checkpoint"]).is_file() and 0 < doc["chosen_r"] <= 1
    assert "warning" not in done.stderr  # the shipped trained checkpoint was found
    assert list(tmp_path.iterdir()) == []


def test_ftwt_profiles_replaces_the_shipped_folder(tmp_path):
    (tmp_path / "mine.toml").write_text('description = "my profile"\nmodel = "resnet20"\n')
    done = _ftwt("profiles", "--json", cwd=tmp_path, FTWT_PROFILES=str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert [row["name"] for row in json.loads(done.stdout)] == ["mine"]


def test_a_profile_file_of_ones_own(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.pt").write_bytes(b"")
    path = tmp_path / "my-run.toml"
    path.write_text('model = "resnet20"\ncheckpoint = "weights/w.pt"\n[dense]\nepochs = 3\n')
    cfg = config_mod.resolve(str(path))
    assert cfg.profile == "my-run" and cfg.model == "resnet20" and cfg.dense_epochs == 3
    assert Path(cfg.checkpoint) == (tmp_path / "weights" / "w.pt").resolve()  # relative to the file
