"""The ``ftwt`` command line: a thin Typer layer. Each command parses its options, calls one workflow
(:mod:`ftwt_cli.workflows`) and renders the result; ``--json`` prints one document on stdout and all
human output goes to stderr."""

from __future__ import annotations

import sys

# Each command module registers its commands on the app; this order is the order of `ftwt --help`.
# isort: off
from ftwt_cli.cli import plan, train, evaluate, calibrate, export  # noqa: F401
# isort: on
from ftwt_cli.cli.app import app


def main() -> None:
    app(prog_name="ftwt")


if __name__ == "__main__":
    sys.exit(main())
