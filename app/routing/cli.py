"""The ``tollgate route`` command group (a thin wrapper over :mod:`app.routing.offline`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.group("route")
def route_group() -> None:
    """The tier router, offline: score prompts with the live router's code and settings."""


@route_group.command("score")
@click.argument("prompts", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--feedback",
    type=click.Path(path_type=Path, dir_okay=False),
    help='Learn these first, in order: {"messages": [...], "tier": "economy", '
    '"outcome": "success"|"failure"} per line.',
)
@click.option("--feature", help="Feature of lines that name none (per-feature rules, models).")
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), help="Not stdout.")
@click.option(
    "--load", type=click.Path(path_type=Path, dir_okay=False), help="Start from this checkpoint."
)
@click.option(
    "--save", type=click.Path(path_type=Path, dir_okay=False), help="Write the checkpoint after."
)
def route_score(
    prompts: Path,
    feedback: Path | None,
    feature: str | None,
    output: Path | None,
    load: Path | None,
    save: Path | None,
) -> None:
    """Write {"score", "tier", "reason"} for each {"messages": [...]} line of PROMPTS.

    score is the estimated probability that the economy tier fails on the prompt; tier is
    what the router would choose (as for model "auto") under the current settings.
    """
    from app.cli import _fail, _settings
    from app.routing.offline import InputError, score_files

    settings = _settings()
    try:
        if output is None:
            summary = score_files(
                prompts, sys.stdout.buffer, settings.routing, feedback=feedback,
                feature=feature, load=load, save=save,
            )  # fmt: skip
        else:
            with output.open("wb") as handle:
                summary = score_files(
                    prompts, handle, settings.routing, feedback=feedback,
                    feature=feature, load=load, save=save,
                )  # fmt: skip
    except InputError as exc:
        _fail(str(exc))
    click.echo(
        f"learned {summary.learned} of {summary.feedback_lines} feedback lines "
        f"(only economy outcomes teach the router); scored {summary.prompts} prompts",
        err=True,
    )
