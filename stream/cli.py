"""The `interest-stream` command line. Each command imports its module lazily: the worker never loads torch."""

from __future__ import annotations

import typer

from models.cli import register as register_model_commands

app = typer.Typer(no_args_is_help=True, add_completion=False, help="A live interest vector for every user.")
bench = typer.Typer(no_args_is_help=True, help="Benchmarks that print ratios measured in one run.")
app.add_typer(bench, name="bench")
register_model_commands(app)


@app.command()
def worker(
    bootstrap: str | None = typer.Option(None, help="Kafka bootstrap servers (env KAFKA_BOOTSTRAP_SERVERS)"),
    partitions: int | None = typer.Option(None, help="Partitions of the topics and table (env TOPIC_PARTITIONS)"),
    state_dir: str | None = typer.Option(None, help="RocksDB directory (env STATE_DIR)"),
    web_port: int | None = typer.Option(None, help="Faust web server port, 0 = off (env WORKER_WEB_PORT)"),
    metrics_port: int | None = typer.Option(None, help="Prometheus port, 0 = off (env METRICS_PORT)"),
) -> None:
    """Run a Faust worker: events topic -> per-user session state (RocksDB + changelog)."""
    from stream.app import run_worker
    from stream.settings import Settings

    overrides = {
        "kafka_bootstrap_servers": bootstrap,
        "topic_partitions": partitions,
        "state_dir": state_dir,
        "worker_web_port": web_port,
        "metrics_port": metrics_port,
    }
    run_worker(Settings(**{k: v for k, v in overrides.items() if v is not None}))
