"""Run the worker as a child process configured from a `Settings` (tests, benchmarks, demos)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import SecretStr

from local.longpoll import max_wait_from_env
from local.process import Supervised
from stream.settings import ENV_PREFIXES, Settings


def settings_env(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The process environment that makes `Settings()` in a child equal `settings` (plus `extra` overrides).

    Inherited variables named like a Settings field, or with a settings prefix (the worker refuses unknown ones:
    `stream.settings.unknown_variables`), are dropped first, so nothing of the caller's shell leaks in; relative
    paths are made absolute, as the child may run in another directory.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in Settings.model_fields and not k.upper().startswith(ENV_PREFIXES)
    }
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


#: The variables that name a fault (local/faults.py): any of them runs the fault-injecting worker.
FAULT_VARIABLES = ("FAULT_KILL_AT", "FAULT_STOP_AT", "FAULT_HANG", "FAULT_POISON_ITEM")


def worker_command(env: Mapping[str, str] | None = None) -> list[str]:
    """The worker's console script in this venv; the fault-injecting worker when `env` names a fault; the worker
    behind the local long-polling shim when `env` switches it on (`local.longpoll`; faults install it too)."""
    if env is not None and any(env.get(name) for name in FAULT_VARIABLES):
        return [sys.executable, "-m", "local.faults"]
    if env is not None and max_wait_from_env(env) is not None:
        return [sys.executable, "-m", "local.longpoll"]
    script = Path(sys.executable).with_name("interest-stream-worker")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from stream.worker import main; main()"]


def spawn_worker(
    env: Mapping[str, str],
    log_path: Path,
    *,
    name: str = "worker",
    die_with_parent: bool = False,
    command: Sequence[str] | None = None,
) -> Supervised:
    """Start the worker (or `command`) with exactly `env`, stdout and stderr appended to `log_path`.

    cwd is the log's folder, so a developer's `.env` in the checkout never configures the child.
    """
    return Supervised(
        name,
        list(command or worker_command(env)),
        log_path,
        env=env,
        cwd=log_path.parent,
        die_with_parent=die_with_parent,
    ).start()
