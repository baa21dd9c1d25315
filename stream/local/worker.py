"""Run `interest-stream worker` as a child process configured from a `Settings` (tests, benchmarks, demos)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import SecretStr

from stream.settings import Settings


def settings_env(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The process environment that makes `Settings()` in a child equal `settings` (plus `extra` overrides).

    Inherited variables named like a Settings field are dropped first, so nothing of the caller's shell leaks
    in; relative paths are made absolute, as the child may run in another directory.
    """
    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, Path):
            value = value.absolute()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[name.upper()] = str(value)
    env.update(extra or {})
    return env


def worker_command() -> list[str]:
    """The venv's console script when there is one, else the same CLI through this interpreter."""
    script = Path(sys.executable).with_name("interest-stream")
    if script.exists():
        return [str(script), "worker"]
    return [sys.executable, "-c", "from stream.cli import app; app()", "worker"]


def spawn_worker(
    env: Mapping[str, str], log_path: Path, *, die_with_parent: bool = False, command: Sequence[str] | None = None
) -> subprocess.Popen[bytes]:
    """Start `interest-stream worker` (or `command`) with exactly `env`, stdout and stderr appended to `log_path`.

    cwd is the log's folder, so a developer's `.env` in the checkout never configures the child; a new session,
    so a Ctrl-C meant for the caller reaches the child only through the caller's own clean stop.
    """
    from stream.local.triton import _die_with_parent

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(command or worker_command()),
            env=dict(env),
            cwd=log_path.parent,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent else None,
        )
