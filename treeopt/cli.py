"""The `treeopt` command line. It only parses arguments and calls library functions."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import List, Optional

import typer

from treeopt.errors import TreeoptError

app = typer.Typer(
    help="treeopt: calibrate Medusa heads, search the best speculative-decoding tree, decode and benchmark it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root():
    """treeopt: calibrate Medusa heads, search the best speculative-decoding tree, decode and benchmark it."""


def command(*args, **kwargs):
    """app.command that turns a TreeoptError into one line on stderr and exit status 2."""

    def register(fn):
        @functools.wraps(fn)
        def run(*a, **kw):
            try:
                return fn(*a, **kw)
            except TreeoptError as e:
                typer.echo(f"error: {e}", err=True)
                raise typer.Exit(2)
            except KeyboardInterrupt:
                typer.echo("interrupted: run the same command again to resume", err=True)
                raise typer.Exit(130)

        return app.command(*args, **kwargs)(run)

    return register


# Options shared by the commands that load a model.
ModelOpt = typer.Option("smollm2-135m", "--model", "-m", help="smollm2-135m (bundled), a local directory, or a Hugging Face id.")
HeadsOpt = typer.Option(None, "--heads", help="Medusa heads directory; default: the heads shipped for the bundled model; `random` for untrained ones.")
DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda or auto.")
DtypeOpt = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16.")


@command()
def info(
    model: str = ModelOpt,
    heads: Optional[str] = HeadsOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Print the model, the heads, the device and library versions."""
    from treeopt.info import describe

    typer.echo(describe(model=model, heads=heads, device=device, dtype=dtype))


# --- train-heads (treeopt.train) ---


# --- calibrate (calibrate/) ---


# --- search, evaluate, sweep (treeopt.search) ---


# --- decode, bench, profile (decoding/) ---


# --- plot, report, demo (reports/) ---


def main():
    app()


if __name__ == "__main__":
    main()
