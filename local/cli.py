"""The `interest-stream` command line (local tooling). Commands import their modules lazily, so `worker` never
loads torch; the worker image has its own entry point, `interest-stream-worker` (stream/worker.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from models.cli import register as register_model_commands
from stream.worker import worker as stream_worker

app = typer.Typer(no_args_is_help=True, add_completion=False, help="A live interest vector for every user.")
bench = typer.Typer(no_args_is_help=True, help="Benchmarks that print ratios measured in one run.")
app.add_typer(bench, name="bench")
register_model_commands(app)


app.command("worker")(stream_worker)


@app.command()
def replay(
    source: str = typer.Argument(..., help="movielens | otto | synthetic"),
    rate: float | None = typer.Option(None, help="Messages per second (default: full speed)"),
    events: int | None = typer.Option(None, help="Synthetic: messages to make; data sets: keep the first N"),
    users: int | None = typer.Option(None, help="Synthetic: users to make; data sets: keep the first N users"),
    malformed_share: float = typer.Option(0.0, help="Share of all messages that are malformed, in [0, 1)"),
    seed: int = typer.Option(0, help="Seed of the synthetic data and of the malformed mix"),
    topic: str | None = typer.Option(None, help="Topic to publish to (env TOPIC_EVENTS)"),
    bootstrap: str | None = typer.Option(None, help="Kafka bootstrap servers (env KAFKA_BOOTSTRAP_SERVERS)"),
    progress: bool = typer.Option(True, help="Show a progress bar"),
) -> None:
    """Publish a data set to the events topic, keyed by user_id."""
    from local.replay import SOURCES
    from local.replay import replay as run_replay
    from stream.settings import Settings

    if source not in SOURCES:
        raise typer.BadParameter(f"choose one of {', '.join(SOURCES)}", param_hint="SOURCE")
    settings = Settings(**({"kafka_bootstrap_servers": bootstrap} if bootstrap else {}))
    result = run_replay(
        settings,
        source,  # type: ignore[arg-type]
        events=events,
        users=users,
        malformed_share=malformed_share,
        seed=seed,
        rate=rate,
        topic=topic,
        progress=progress,
    )
    typer.echo(
        f"sent {result.sent} messages ({result.malformed} malformed) to {result.topic} "
        f"in {result.seconds:.2f} s: {result.events_per_s:,.0f} msg/s"
    )


@app.command()
def forget(
    user_id: str = typer.Argument(..., help="The user to erase: the user_id (and key) of their events"),
    topic: str | None = typer.Option(None, help="Events topic (env TOPIC_EVENTS)"),
    bootstrap: str | None = typer.Option(None, help="Kafka bootstrap servers (env KAFKA_BOOTSTRAP_SERVERS)"),
) -> None:
    """Erase a user: publish a forget message to the events topic, keyed by the user (docs/events.md). The worker
    deletes their state and latest interest (RocksDB and changelogs) and publishes a tombstone on the output topic."""
    import time

    from core.schema import Forget, Rejection, encode_event, parse_event
    from local.broker import run_sync
    from local.replay import publish
    from stream.settings import Settings

    settings = Settings(**({"kafka_bootstrap_servers": bootstrap} if bootstrap else {}))
    key, value = user_id.encode(), encode_event(Forget(user_id, "forget", int(time.time() * 1000)))
    if isinstance(checked := parse_event(value, key), Rejection):  # the worker would dead-letter it
        raise typer.BadParameter(checked.detail, param_hint="USER_ID")
    result = run_sync(publish(settings, [(key, value)], topic=topic, progress=False))
    typer.echo(f"forget {user_id!r} sent to {result.topic}")


@app.command()
def tail(
    topic: str | None = typer.Option(None, help="Topic to read (default: the events topic, env TOPIC_EVENTS)"),
    from_beginning: bool = typer.Option(False, "--from-beginning", help="Start at the oldest record"),
    max_records: int | None = typer.Option(None, "--max", help="Stop after N records"),
    idle_timeout: float | None = typer.Option(None, help="Stop after this many seconds without a record"),
    bootstrap: str | None = typer.Option(None, help="Kafka bootstrap servers (env KAFKA_BOOTSTRAP_SERVERS)"),
) -> None:
    """Print a topic's records (key, partition, offset, JSON value; headers for a -dlq topic)."""
    from local.broker import run_sync
    from local.tail import tail as run_tail
    from stream.settings import Settings

    settings = Settings(**({"kafka_bootstrap_servers": bootstrap} if bootstrap else {}))
    try:
        run_sync(
            run_tail(
                settings, topic, from_beginning=from_beginning, max_records=max_records, idle_timeout_s=idle_timeout
            )
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--topic") from exc


@app.command()
def triton(
    repo: Path = typer.Option(..., help="Triton model repository, e.g. the CPU twin written by `export`"),
    http_port: int | None = typer.Option(None, help="HTTP port on 127.0.0.1 (default: a free one)"),
    grpc_port: int | None = typer.Option(None, help="gRPC port on 127.0.0.1 (default: a free one)"),
    metrics_port: int | None = typer.Option(None, help="Prometheus metrics port on 127.0.0.1 (default: a free one)"),
    log_file: Path | None = typer.Option(None, help="server log (default: .local/triton/logs/)"),
    log_verbose: int = typer.Option(0, help="tritonserver --log-verbose level"),
    model_control: str = typer.Option(
        "explicit",
        help="explicit: a new version directory is served once POST <http>/v2/repository/models/<m>/load "
        "asks for it (as in production); none: the repository as it was at start-up",
    ),
) -> None:
    """Serve a model repository with the local tritonserver (nvidia-pytriton) until SIGTERM or Ctrl-C."""
    from local.triton import LocalTriton

    if model_control not in ("explicit", "none"):
        raise typer.BadParameter("explicit or none", param_hint="--model-control")
    server = LocalTriton(
        repo,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        log_file=log_file,
        log_verbose=log_verbose,
        model_control=model_control,  # type: ignore[arg-type]
    ).start()
    typer.echo(f"models   {', '.join(server.models)} READY")
    typer.echo(f"log      {server.log_file}")
    typer.echo(f"pid      {server.pid}")
    typer.echo(f"http     {server.http_url}")
    typer.echo(f"metrics  {server.metrics_url}")
    typer.echo(f"grpc     {server.grpc_url}")
    if model_control == "explicit":
        typer.echo(f"load     curl -X POST {server.http_url}/v2/repository/models/<model>/load   (a new version)")
    sys.stdout.flush()
    code = server.serve_forever()
    typer.echo(f"tritonserver stopped (exit code {code})")
    raise typer.Exit(0 if code in (0, None) else 1)


@app.command()
def learn(
    checkpoint: Path = typer.Option(Path("artifacts/model"), help="checkpoint of the newest version in --repo"),
    repo: Path = typer.Option(Path("artifacts/model_repository"), help="production repository (twin: <repo>-twin)"),
    state_dir: Path = typer.Option(Path("artifacts/learner"), help="checkpoints of the promoted versions"),
    interval_events: int = typer.Option(5000, help="a learning step after this many new events ..."),
    interval_s: float = typer.Option(600.0, help="... or this long after the last one (0: events only)"),
    steps: int = typer.Option(100, help="fine-tuning steps per interval"),
    cpu_budget_s: float = typer.Option(120.0, help="fine-tuning CPU seconds per interval, at most"),
    threads: int = typer.Option(1, help="torch threads"),
    nice: int = typer.Option(10, help="the trainer's nice increment (the workers and Triton come first)"),
    triton_http: str = typer.Option("", help="Triton HTTP URL: load each new version (explicit model control)"),
    metrics_port: int = typer.Option(9110, help="Prometheus metrics port"),
    bootstrap: str | None = typer.Option(None, help="Kafka bootstrap servers (env KAFKA_BOOTSTRAP_SERVERS)"),
) -> None:
    """The continuous trainer: learns from the events topic, exports and loads each promoted version (issue 27).
    Kafka connection and security (KAFKA_*, TOPIC_EVENTS) are the worker's settings, from the same variables."""
    import asyncio
    import logging
    import os

    from prometheus_client import start_http_server

    from local.learner import LearnerConfig, run
    from stream.settings import Settings, UnknownSetting, check_environment

    try:  # a misspelt KAFKA_SASL_* would otherwise connect without it: refused as the worker refuses it
        check_environment(os.environ)
    except UnknownSetting as exc:
        typer.echo(f"interest-stream learn: refusing to start: {exc}", err=True)
        raise typer.Exit(2) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings(**({"kafka_bootstrap_servers": bootstrap} if bootstrap else {}))
    cfg = LearnerConfig(checkpoint=checkpoint, repo=repo, state_dir=state_dir, interval_events=interval_events,
                        interval_s=interval_s, steps=steps, cpu_budget_s=cpu_budget_s, threads=threads, nice=nice,
                        triton_http=triton_http)  # fmt: skip
    start_http_server(metrics_port)
    asyncio.run(run(settings, cfg))


@bench.command("ingest")
def bench_ingest(
    events: int = typer.Option(200_000, help="Synthetic events to publish and ingest"),
    users: int | None = typer.Option(None, help="Synthetic users (default: events / 100)"),
    partitions: int = typer.Option(8, help="Partitions of the input topic and the table"),
    seed: int = typer.Option(0, help="Seed of the synthetic events"),
    profile: Path | None = typer.Option(None, help="Run the worker under cProfile, stats to this file (slower)"),
) -> None:
    """Worker ingest events/s vs a bare aiokafka consumer on the same local broker, and state bytes per user."""
    from local.bench.ingest import print_result, run

    print_result(run(events, users or max(1, events // 100), partitions=partitions, seed=seed, profile=profile))


@app.command()
def demo(
    work_dir: Path = typer.Option(Path(".local/demo"), help="broker data, worker state and server logs"),
    artifacts: Path = typer.Option(Path("artifacts"), help="model checkpoint and Triton repositories (cached)"),
    retrain: bool = typer.Option(False, help="train and export again even when a model is cached"),
    rate: float | None = typer.Option(None, help="replay rate in events/s (default: full speed)"),
    keep_running: bool = typer.Option(False, help="after the replay, keep everything up until Ctrl-C"),
    users: int | None = typer.Option(None, help="replay only the first N MovieLens users (default: all 610)"),
    learn: bool = typer.Option(False, help="also run the continuous trainer (interest-stream learn) on the stream"),
) -> None:
    """Local pipeline: broker, model (trained once), Triton twin, worker; replay MovieLens with a live view."""
    from local.demo import run_demo

    run_demo(work_dir, artifacts, retrain=retrain, rate=rate, keep_running=keep_running, users=users, learn=learn)


@bench.command("pipeline")
def bench_pipeline(
    events: int = typer.Option(1_000_000, help="Synthetic events for the saturation run"),
    users: int | None = typer.Option(None, help="Synthetic users (default: events / 100)"),
    repo: Path = typer.Option(Path("artifacts/model_repository-twin"), help="Triton twin repository to serve"),
    batch_max: int | None = typer.Option(None, help="WORKER_BATCH_MAX (default: the worker's default)"),
    batch_wait_s: float | None = typer.Option(None, help="WORKER_BATCH_WAIT_S (default: the worker's default)"),
    naive_events: int = typer.Option(3_000, help="Events for the one-request-per-event run"),
    latency_s: float = typer.Option(30.0, help="Seconds of live events at half the measured rate"),
    seed: int = typer.Option(0, help="Seed of the synthetic events"),
) -> None:
    """Pipeline events/s vs a bare consume->produce passthrough, seq/event, naive speed-up, latency, Triton."""
    from local.bench.pipeline import print_result, run

    result = run(
        events, users or max(1, events // 100), repo, batch_max=batch_max, batch_wait_s=batch_wait_s,
        naive_events=naive_events, latency_s=latency_s, seed=seed, log=typer.echo,
    )  # fmt: skip
    print_result(result)


@bench.command("hol")
def bench_hol(
    hot_events: int = typer.Option(100_000, help="Events of the one hot user, published before the worker starts"),
    probes: int = typer.Option(50, help="Other users sending one live event per second each"),
    seconds: float = typer.Option(20.0, help="Seconds of probes at least (they go on until the backlog drained)"),
    repo: Path = typer.Option(Path("artifacts/model_repository-twin"), help="Triton twin repository to serve"),
) -> None:
    """Head-of-line blocking: other users' event->output latency while one user's huge backlog drains."""
    from local.bench.hol import print_result, run

    print_result(run(repo, hot_events=hot_events, probes=probes, seconds=seconds, log=typer.echo))


@bench.command("failover")
def bench_failover(
    users: int = typer.Option(100_000, help="Users in state before the kill (one event each)"),
    workers: int = typer.Option(2, min=2, help="Workers in the group; worker0 is killed"),
    partitions: int = typer.Option(8, help="Partitions of the events topic and the table"),
    rate: float = typer.Option(100.0, help="Live events/s during the failover"),
    repo: Path = typer.Option(Path("artifacts/model_repository-twin"), help="Triton twin repository to serve"),
    work_dir: Path = typer.Option(Path(".local/bench-failover"), help="broker data, worker state and logs"),
) -> None:
    """Takeover time after a worker is killed, with standby replicas 1 and 0, and the changelog restore rate."""
    from local.bench.failover import print_result, run

    print_result(run(repo, work_dir, users=users, workers=workers, partitions=partitions, rate=rate, log=typer.echo))


@bench.command("live")
def bench_live(
    rates: str = typer.Option("100,250,500,1000,2000", help="Offered rates in events/s, comma-separated, ascending"),
    seconds: float = typer.Option(20.0, help="Seconds of live traffic per rate"),
    users: int = typer.Option(10_000, help="Users (Zipf-distributed activity)"),
    zipf: float = typer.Option(1.0, help="Zipf exponent of user activity"),
    repo: Path = typer.Option(Path("artifacts/model_repository-twin"), help="Triton twin repository to serve"),
    work_dir: Path = typer.Option(Path(".local/bench-live"), help="broker data, worker state, logs and the plot"),
    slo_ms: float = typer.Option(250.0, help="p99 latency that defines the live capacity"),
    drain_s: float = typer.Option(5.0, help="After a rate's traffic, wait up to this long for its last records"),
    give_up_s: float = typer.Option(10.0, help="Stop a rate (and the sweep) when an unserved event is this old"),
    warmup_s: float = typer.Option(5.0, help="Uncounted traffic at the first rate before the sweep"),
    idle_s: float = typer.Option(10.0, help="Seconds over which the idle worker's CPU is read"),
    cost_events: int = typer.Option(20_000, help="Pre-filled events for the worker vs no-op Faust agent cost"),
    longpoll_ms: float = typer.Option(100.0, help="Cap of the local long-polling shim's wait (local/longpoll.py)"),
    no_longpoll: bool = typer.Option(False, "--no-longpoll", help="Run the workers without the shim"),
    batch_max: int | None = typer.Option(None, help="WORKER_BATCH_MAX (default: the worker's default)"),
    batch_wait_s: float | None = typer.Option(None, help="WORKER_BATCH_WAIT_S (default: the worker's default)"),
    plot: Path | None = typer.Option(None, help="PNG of rate vs p99 (default: <work-dir>/live-capacity.png)"),
    seed: int = typer.Option(0, help="Seed of the synthetic traffic"),
    envelope: int = typer.Option(1, min=1, max=500, help="Events per message: batch envelopes of one user's events"),
    in_flight: int | None = typer.Option(None, min=1, max=8, help="WORKER_BATCHES_IN_FLIGHT (1: the serial step)"),
) -> None:
    """Latency at a downstream consumer per offered rate, live capacity at the SLO, framework cost, idle CPU."""
    from local.bench.live import print_result, run

    try:
        offered = [float(r) for r in rates.split(",") if r.strip()]
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--rates") from exc
    if not offered or offered != sorted(offered) or min(offered) <= 0:
        raise typer.BadParameter("give positive rates in ascending order", param_hint="--rates")
    result = run(
        repo, work_dir, rates=offered, seconds=seconds, users=users, zipf_a=zipf, slo_ms=slo_ms, drain_s=drain_s,
        give_up_s=give_up_s, warmup_s=warmup_s, idle_s=idle_s, cost_events=cost_events,
        longpoll_ms=None if no_longpoll else longpoll_ms, batch_max=batch_max, batch_wait_s=batch_wait_s, plot=plot,
        seed=seed, envelope=envelope, in_flight=in_flight, log=typer.echo,
    )  # fmt: skip
    print_result(result)


@bench.command("model")
def bench_model(
    repo: Path = typer.Option(Path("artifacts/model_repository-twin"), help="twin repository of the new graph"),
    previous: Path = typer.Option(
        Path("artifacts/previous/model_repository-twin"), help="twin repository of the graph served until now"
    ),
    threads: str = typer.Option("1,2", help="onnxruntime intra-op thread counts, comma-separated"),
    batches: str = typer.Option("1,8,32,128", help="batch sizes in-process, comma-separated"),
    twin_batches: str = typer.Option("32,128", help="batch sizes through the twin ('' = skip the twin)"),
    seconds: float = typer.Option(3.0, help="per graph, thread count and batch size, over all rounds"),
    rounds: int = typer.Option(3, help="alternating rounds (the best of each side is kept)"),
    dataset: str = typer.Option("movielens", help="served NDCG@10 on this data set's test users ('' = skip)"),
) -> None:
    """The previous and the new model graph side by side: CPU ms per sequence, agreement, served NDCG@10."""
    from local.bench.model import print_result, run

    ints = lambda s: [int(v) for v in s.split(",") if v.strip()]  # noqa: E731
    result = run(
        repo, previous, threads=ints(threads), batches=ints(batches), twin_batches=ints(twin_batches),
        seconds=seconds, rounds=rounds, dataset=dataset or None, log=typer.echo,
    )  # fmt: skip
    print_result(result)
