"""Model commands (train, eval, export). Torch is imported inside each command, never at module load."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach the model commands to the `interest-stream` CLI."""
