"""`interest-stream demo`: the whole pipeline on this machine in one command.

Broker (noida-db) -> worker (Faust + RocksDB) -> Triton (the CPU twin of the exported model) -> output topic.
The model is trained and exported on the first run (a subprocess: `stream` never imports torch) and reused
after. MovieLens is replayed while a live table shows what the worker's own Prometheus metrics say; at the end
a few users' profiles are read back through the worker's HTTP view, and everything is stopped by PID.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from local.broker import run_sync
from local.pipeline import LocalPipeline, http_json
from local.replay import ReplayResult, load_messages, publish
from local.scrape import Snapshot, histogram_quantile

MODEL_NAME = "interest_transformer"


def ensure_model(artifacts: Path, retrain: bool = False, console: Console | None = None) -> Path:
    """The CPU twin repository, training (≤ 10 min on 2 cores) and exporting first when it is missing."""
    console = console or Console()
    checkpoint, production = artifacts / "model", artifacts / "model_repository"
    twin = production.with_name(production.name + "-twin")
    cli = [sys.executable, "-c", "from local.cli import app; app()"]
    onnx, trained = twin / MODEL_NAME / "1" / "model.onnx", checkpoint / "checkpoint.pt"
    if not retrain and onnx.exists() and (not trained.exists() or trained.stat().st_mtime <= onnx.stat().st_mtime):
        return twin  # exported from the newest checkpoint (or shipped without one)
    if retrain or not trained.exists():
        console.print(f"[bold]training[/] the interest Transformer on MovieLens -> {checkpoint} (once; ≤ 10 min)")
        subprocess.run([*cli, "train", "--out", str(checkpoint)], check=True)
    console.print(f"[bold]exporting[/] {checkpoint} -> {production} and {twin}")
    subprocess.run([*cli, "export", "--checkpoint", str(checkpoint), "--out", str(production)], check=True)
    return twin


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f} ms"


def _live_table(sent: int, first: Snapshot, prev: Snapshot, now: Snapshot) -> Table:
    dt = max(now.at - prev.at, 1e-6)
    table = Table(title="interest-stream demo (worker metrics)", show_header=True)
    for column in ("events sent", "events handled", "events/s", "outputs", "outputs/s", "pending", "p50", "p99"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{sent:,}",
        f"{now.handled - first.handled:,.0f}",
        f"{(now.handled - prev.handled) / dt:,.0f}",
        f"{now.outputs:,.0f}",
        f"{(now.outputs - prev.outputs) / dt:,.0f}",
        f"{now.pending:,.0f}",
        _ms(histogram_quantile(0.5, now.latency_buckets)),
        _ms(histogram_quantile(0.99, now.latency_buckets)),
    )
    return table


def print_profiles(console: Console, web_url: str, users: list[str]) -> None:
    """A few users' latest interest, read back through the worker's HTTP view, with genres and titles."""
    from models.datasets import movielens_movies  # torch-free loader of the shipped data

    titles = {movie_id: movie.title for movie_id, movie in movielens_movies().items()}
    for user in users:
        record = http_json(f"{web_url}/users/{user}/interest")
        if not record:
            console.print(f"user {user}: no interest published")
            continue
        genres = ", ".join(f"{c['id']} {c['score']:.2f}" for c in record["top_categories"][:3])
        movies = "; ".join(titles.get(i["id"], i["id"]) for i in record["top_items"][:3])
        drivers = "; ".join(
            f"{time.strftime('%Y-%m-%d', time.gmtime(e['session_start_ms'] / 1000))} ({e['events']} ratings, "
            f"{e['weight']:.0%}: {titles.get(e['top_items'][0], e['top_items'][0]) if e['top_items'] else '-'})"
            for e in record.get("explanation", [])
        )
        console.print(
            f"[bold]user {user}[/] (seq {record['seq']}, {record['events_seen']} ratings, "
            f"{record['sessions_seen']} sessions)\n  top genres: {genres}\n  top movies: {movies}"
            f"\n  driven by sessions: {drivers or '-'}"
        )


def run_demo(
    work_dir: Path = Path(".local/demo"),
    artifacts: Path = Path("artifacts"),
    retrain: bool = False,
    rate: float | None = None,
    keep_running: bool = False,
    users: int | None = None,
    learn: bool = False,
) -> None:
    console = Console()
    twin = ensure_model(artifacts, retrain, console)
    if learn:  # the trainer adds versions: serve a copy, so the cached repositories stay as exported
        twin = learning_copy(artifacts, work_dir)
    messages = load_messages("movielens", users=users)
    counts = Counter(key.decode() for key, _ in messages.records)
    by_count = sorted(counts, key=lambda u: (counts[u], u))
    profile_users = list(dict.fromkeys([by_count[len(by_count) // 2], by_count[-len(by_count) // 10], by_count[-1]]))
    console.print(f"starting broker, Triton ({twin}) and worker in {work_dir} ...")
    with LocalPipeline(work_dir, repo=twin, model_control="explicit" if learn else "none") as pipe:
        console.print(f"metrics  {pipe.metrics_url}\nhttp     {pipe.web_url}/users/<user_id>/interest")
        trainer = start_learner(pipe, artifacts, twin, work_dir, len(messages.records)) if learn else None
        result: list[ReplayResult] = []
        sender = threading.Thread(
            target=lambda: result.append(run_sync(publish(pipe.settings, messages, rate=rate, progress=False))),
            daemon=True,
        )
        sender.start()
        first = prev = Snapshot.scrape(pipe.metrics_url)
        stable_since = None
        with Live(console=console, refresh_per_second=2) as live:
            while True:
                time.sleep(1.0)
                now = Snapshot.scrape(pipe.metrics_url)
                live.update(_live_table(result[0].sent if result else 0, first, prev, now))
                finished = bool(result) and now.handled - first.handled >= result[0].sent and now.pending == 0
                stable_since = (stable_since or now.at) if finished and now.outputs == prev.outputs else None
                prev = now
                if stable_since is not None and now.at - stable_since >= 2.0:
                    break
        sent = result[0]
        console.print(
            f"replayed {sent.sent:,} MovieLens ratings in {sent.seconds:.1f} s; worker done after "
            f"{prev.at - first.at:.1f} s: {prev.outputs:,.0f} interest updates, "
            f"event->output p50 {_ms(histogram_quantile(0.5, prev.latency_buckets))}, "
            f"p99 {_ms(histogram_quantile(0.99, prev.latency_buckets))}"
        )
        if trainer is not None:
            wait_for_learning(console, pipe, *trainer)
        print_profiles(console, pipe.web_url, profile_users)
        console.print(
            f"output topic: interest-stream tail --topic {pipe.settings.topic_output} --from-beginning "
            f"--bootstrap {pipe.settings.kafka_bootstrap_servers}"
        )
        if keep_running:
            console.print("running until Ctrl-C ...")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        console.print("stopping worker, Triton and broker ...")
    console.print("stopped.")


def learning_copy(artifacts: Path, work_dir: Path) -> Path:
    """A fresh copy of the exported repositories (production and twin) for the trainer to add versions to."""
    import shutil

    dest = work_dir.absolute() / "learn"
    shutil.rmtree(dest, ignore_errors=True)
    for name in ("model_repository", "model_repository-twin"):
        shutil.copytree(artifacts / name, dest / name)
    return dest / "model_repository-twin"


def start_learner(pipe: LocalPipeline, artifacts: Path, twin: Path, work_dir: Path, events: int):
    """`interest-stream learn` as a child (nice 10, one thread): a step per third of the replay (it reads up to 5000
    events between checks, so two steps at least), a promoted version loaded into Triton."""
    from local.process import Supervised, free_port
    from local.worker import settings_env

    port = free_port()
    command = [
        sys.executable, "-c", "from local.cli import app; app()", "learn",
        "--checkpoint", str(artifacts.absolute() / "model"), "--repo", str(twin.with_name("model_repository")),
        "--state-dir", str(twin.parent / "learner"), "--interval-events", str(max(1, events // 3)),
        "--interval-s", "0", "--steps", "50", "--triton-http", pipe.triton.http_url, "--metrics-port", str(port),
    ]  # fmt: skip
    log = work_dir.absolute() / "learner.log"
    proc = Supervised("learner", command, log, env=settings_env(pipe.settings), die_with_parent=True).start()
    return proc, f"http://127.0.0.1:{port}/metrics"


def wait_for_learning(console: Console, pipe: LocalPipeline, proc, metrics_url: str, timeout_s: float = 900.0) -> None:
    """Until the trainer has made its two steps (or `timeout_s`); then what it did and the version served."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    def samples(url: str) -> dict[tuple[str, tuple], float]:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return {}
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip

    console.print(f"waiting for the trainer's steps (interest-stream learn, log: {proc.log_path}) ...")
    deadline, steps = time.monotonic() + timeout_s, 0.0
    while time.monotonic() < deadline:
        proc.check_alive()
        steps = samples(metrics_url).get(("interest_learner_step_cpu_seconds_count", ()), 0.0)
        if steps >= 2:
            break
        time.sleep(2.0)
    m = samples(metrics_url)
    refused = {dict(k[1])["reason"]: v for k, v in m.items() if k[0] == "interest_learner_candidates_refused_total"}
    served = [dict(k[1])["version"] for k, v in samples(pipe.metrics_url).items()
              if k[0] == "interest_model_version_info" and v == 1]  # fmt: skip
    console.print(
        f"trainer: {steps:.0f} steps, {m.get(('interest_learner_promotions_total', ()), 0):.0f} promoted, "
        f"refused {refused or 0}, vocabulary {m.get(('interest_learner_vocabulary_size', ()), 0):.0f} items, "
        f"exported version {m.get(('interest_learner_served_version', ()), 0):.0f}; the worker serves {served}"
    )
    proc.stop()
