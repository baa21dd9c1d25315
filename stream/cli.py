"""The `interest-stream` command line. Each command imports its module lazily: the worker never loads torch."""

from __future__ import annotations

import typer

from models.cli import register as register_model_commands

app = typer.Typer(no_args_is_help=True, add_completion=False, help="A live interest vector for every user.")
bench = typer.Typer(no_args_is_help=True, help="Benchmarks that print ratios measured in one run.")
app.add_typer(bench, name="bench")
register_model_commands(app)
