"""Command line: parse options, call one library function, print its report, set the exit code."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from effdiff import __version__
from effdiff._deps import MissingDependency
from effdiff.errors import EffdiffError, ValidationFailed


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Known failures become one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ValidationFailed as exc:
            click.echo(str(exc), err=True)
            click.echo("error: validation beyond tolerance (artifacts and manifest kept)", err=True)
            sys.exit(1)
        except (EffdiffError, MissingDependency) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo(
                "interrupted: finished artifacts are kept; run the same command again to resume", err=True
            )
            sys.exit(130)

    return wrapper


@click.group()
@click.version_option(__version__, prog_name="effdiff")
def main() -> None:
    """effdiff: export Stable-Diffusion-class models as split-UNet graphs and run them fast."""


@click.group("export")
def export_main() -> None:
    """Export a diffusers model to deployable artifacts."""


main.add_command(export_main)


@export_main.command("onnx")
@click.option("--model", required=True, help="diffusers pipeline folder, or a built-in: tiny-sd1, tiny-sd2")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="artifacts folder to write")
@click.option("--opset", default=20, show_default=True, type=click.IntRange(18, 23))
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16"]))
@click.option("--height", type=int, help="image height in pixels used for validation (default: model's)")
@click.option("--width", type=int, help="image width in pixels used for validation (default: model's)")
@click.option("--quiet", is_flag=True, help="no progress bar")
@user_errors
def export_onnx_cmd(
    model: str, out: Path, opset: int, precision: str, height: int | None, width: int | None, quiet: bool
) -> None:
    """Split the UNet into encoder/decoder, export all graphs to ONNX and validate them against PyTorch."""
    from effdiff.export.onnx import ExportRecipe, Precision, export_onnx

    recipe = ExportRecipe(opset=opset, precision=Precision(precision), height=height, width=width)
    report = export_onnx(model, out, recipe, progress=not quiet, log=lambda m: click.echo(m, err=True))
    click.echo(report.table())
    click.echo(f"all graphs within tolerance; manifest: {out / 'manifest.json'}")
