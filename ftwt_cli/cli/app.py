"""The Typer application and what every command shares: options, the resolved configuration on stderr,
and the error handling behind the exit codes (0 success, 2 bad input: one line on stderr, nothing
written; 1 anything else)."""

from __future__ import annotations

import functools
import os
import warnings
from typing import Annotated, Any, Callable, Optional

import typer

from ftwt_cli.console import console
from ftwt_cli.core.graph import UnsupportedModel
from ftwt_cli.errors import BadInput
from ftwt_cli.io import config as config_mod

app = typer.Typer(
    name="ftwt",
    help="Plan, train and evaluate FTWT dynamic pruning (Fire Together Wire Together, CVPR 2022).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Shared options. Each defaults to None, meaning "the profile's value".
ProfileOpt = Annotated[str, typer.Option("--profile", help="Profile name (see 'ftwt profiles').")]
ModelOpt = Annotated[
    Optional[str], typer.Option("--model", help="Registry name, package.module:callable or path/to/file.py:callable.")
]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="synthetic | cifar10 | cifar100 | imagefolder:PATH")]
CheckpointOpt = Annotated[
    Optional[str],
    typer.Option(
        "--checkpoint",
        help="Weights to load: an ftwt checkpoint, a plain state_dict (torch.save(model.state_dict(), FILE)) "
        "or 'torchvision' (pretrained weights of resnet18/resnet34/mobilenet_v2).",
    ),
]
ImageSizeOpt = Annotated[
    Optional[int],
    typer.Option("--image-size", help="Input side in pixels, e.g. 32 or 224 (0: the model's own; other models take 32)."),
]
SamplesOpt = Annotated[Optional[int], typer.Option("--samples", help="Cap on images per data pass (0: all).")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Images per batch.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed for subsets, shuffling and noise.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (human output on stderr).")]
DataRootOpt = Annotated[Optional[str], typer.Option("--data-root", help="Where CIFAR is stored or downloaded.")]
DownloadOpt = Annotated[Optional[bool], typer.Option("--download/--no-download", help="Allow fetching CIFAR.")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", help="DataLoader worker processes.")]
TargetOpt = Annotated[
    Optional[float],
    typer.Option("--target-flops", help="Percent of dense FLOPs to REMOVE (50 halves them), in (0, 100)."),
]


def resolve_config(profile: str, show: bool = True, **overrides: Any) -> config_mod.Config:
    """Load the profile, apply CLI overrides, print the resolved configuration to stderr."""
    cfg = config_mod.resolve(profile, **overrides)
    if show:
        shown = ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items() if k != "description")
        console.print(f"[dim]config: {shown}[/dim]", soft_wrap=True, highlight=False)
    return cfg


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)


def handle_errors(func: Callable) -> Callable:
    """Turn known failures into one line on stderr and the documented exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        warnings.showwarning = _show_warning
        try:
            return func(*args, **kwargs)
        except (BadInput, UnsupportedModel) as exc:  # a model ftwt cannot gate is bad input too
            _fail(_one_line(exc), BadInput.exit_code)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if os.environ.get("FTWT_DEBUG"):
                raise
            _fail(f"{type(exc).__name__}: {_one_line(exc)} (set FTWT_DEBUG=1 for a traceback)", 1)

    return wrapper


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    # Errors raised in DataLoader workers arrive wrapped with the worker's traceback; keep the cause.
    last = lines[-1]
    for prefix in ("ftwt_cli.errors.BadInput: ", "BadInput: "):
        if last.startswith(prefix):
            return last[len(prefix) :]
    return lines[0]


def _fail(message: str, code: int) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)
