"""The Typer application and what every command shares: options, the configuration line on stderr, and
the error handling behind the exit codes (0 success, 2 bad input: one line on stderr, nothing written;
1 anything else).

Nothing here imports torch: ``ftwt --help`` and ``ftwt --version`` stay fast. Each command imports its
workflow when it runs (function-local imports, allowed in ``ftwt_cli/cli/`` only; see tests/test_layers.py).
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Annotated, Any, Callable, Optional

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from ftwt_cli.cli.names import DEFAULT_PROFILE
from ftwt_cli.console import console, error_line
from ftwt_cli.errors import BadInput


def _no_flag_types(params: list[Any]) -> list[Any]:
    # Typer's rich help shows a flag's type as '<bool>'; a flag takes no value, so show none.
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    return params


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _no_flag_types(super().get_params(ctx))


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _no_flag_types(super().get_params(ctx))


app = typer.Typer(
    name="ftwt",
    cls=_Group,
    help="Plan, train and evaluate FTWT dynamic pruning (Fire Together Wire Together, CVPR 2022).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def command(name: str) -> Callable:
    """``@command("eval")``: register a command on the app (with the help fixes of :class:`_Command`)."""
    return app.command(name, cls=_Command)


def version() -> str:
    """The installed distribution's version, else the source tree's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("ftwt")
    except PackageNotFoundError:
        from ftwt_cli import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        print(f"ftwt {version()}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True)
    ] = False,
) -> None:
    """Plan, train and evaluate FTWT dynamic pruning (Fire Together Wire Together, CVPR 2022)."""


# Shared options. Each defaults to None, meaning "the profile's value".
ProfileOpt = Annotated[str, typer.Option("--profile", help="Profile name (see 'ftwt profiles') or a TOML file.")]
ModelOpt = Annotated[
    Optional[str], typer.Option("--model", help="Registry name, package.module:callable or path/to/file.py:callable.")
]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="synthetic | cifar10 | cifar100 | imagefolder:PATH")]
CHECKPOINT_HELP = (
    "Weights to load: an ftwt checkpoint, a plain state_dict (torch.save(model.state_dict(), FILE)) "
    "or 'torchvision' (pretrained weights of resnet18/resnet34/mobilenet_v2)."
)
CheckpointOpt = Annotated[Optional[str], typer.Option("--checkpoint", help=CHECKPOINT_HELP)]
ImageSizeOpt = Annotated[
    Optional[int],
    typer.Option("--image-size", help="Input side in pixels, e.g. 32 or 224 (0: the model's own; other models take 32)."),
]
SamplesOpt = Annotated[Optional[int], typer.Option("--samples", help="Cap on images per data pass (0: all).")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Images per batch.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed for subsets, shuffling and noise.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (human output on stderr).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", help="Print the whole resolved configuration on stderr first.")]
DataRootOpt = Annotated[Optional[str], typer.Option("--data-root", help="Where CIFAR is stored or downloaded.")]
DownloadOpt = Annotated[Optional[bool], typer.Option("--download/--no-download", help="Allow fetching CIFAR.")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", help="DataLoader worker processes.")]
TargetOpt = Annotated[
    Optional[float],
    typer.Option("--target-flops", help="Percent of dense FLOPs to REMOVE (50 halves them), in (0, 100)."),
]


def alias(name: str, metavar: str = "TEXT") -> Any:
    """A hidden option: an old spelling kept working (see :func:`spelled`), not shown in help."""
    return typer.Option(name, hidden=True, metavar=metavar)


def spelled(value: Any, old: Any, canonical: str, old_name: str) -> tuple[Any, str]:
    """The value of an option given as ``canonical`` or its hidden old spelling, and the name the user typed
    (messages name the option as typed)."""
    if value is not None and old is not None:
        raise BadInput(f"{old_name} is the old spelling of {canonical}; give {canonical} once")
    return (old, old_name) if old is not None else (value, canonical)


def resolve_config(profile: str, verbose: bool = False, show: bool = True, **overrides: Any):
    """Load the profile and apply CLI overrides; on stderr, one line naming what runs (``--verbose``: the
    whole configuration, which ``ftwt train`` also writes to its run directory's config.json)."""
    from ftwt_cli.io import config as config_mod

    cfg = config_mod.resolve(profile, **overrides)
    if show:
        if verbose:
            shown = ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items() if k != "description")
            console.print(f"config: {shown}", soft_wrap=True, highlight=False, style="dim")
        else:
            console.print(f"config: {cfg.model} on {cfg.data}, profile {profile} (--verbose: all)", highlight=False, style="dim")
    return cfg


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    error_line(str(message), label="warning", style="yellow")


def handle_errors(func: Callable) -> Callable:
    """Turn known failures into one line on stderr and the documented exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        warnings.showwarning = _show_warning
        try:
            return func(*args, **kwargs)
        except BadInput as exc:
            _fail(_one_line(exc), BadInput.exit_code)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if _unsupported_model(exc):  # a model ftwt cannot gate is bad input too
                _fail(_one_line(exc), BadInput.exit_code)
            if os.environ.get("FTWT_DEBUG"):
                raise
            _fail(f"{type(exc).__name__}: {_one_line(exc)} (set FTWT_DEBUG=1 for a traceback)", 1)

    return wrapper


def _unsupported_model(exc: Exception) -> bool:
    from ftwt_cli.core.graph import UnsupportedModel  # torch is loaded by now: a command ran

    return isinstance(exc, UnsupportedModel)


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
    error_line(message)
    raise typer.Exit(code)
