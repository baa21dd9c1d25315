"""Model commands (train, eval, export, explain-check, eval-scenarios). Torch is imported inside each command."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Attach the model commands to the `interest-stream` CLI."""
    app.command("train")(train_command)
    app.command("eval")(eval_command)
    app.command("export")(export_command)
    app.command("refit")(refit_command)
    app.command("explain-check")(explain_check_command)
    app.command("eval-scenarios")(eval_scenarios_command)
    app.command("eval-stream")(eval_stream_command)


def train_command(
    out: Path = typer.Option(Path("artifacts/model"), help="checkpoint directory"),
    dataset: str = typer.Option("movielens", help="movielens | otto"),
    seed: int = typer.Option(0),
    max_epochs: int = typer.Option(200),
    max_minutes: float = typer.Option(8.0, help="wall-clock cap (early stopping usually ends sooner)"),
    fusion: bool = typer.Option(False, help="long-/short-term session fusion (off by default: see docs/model.md)"),
    session_pos: bool = typer.Option(True, help="session-distance attention bias"),
    time_gaps: bool = typer.Option(True, help="time-gap embeddings"),
    d_model: int | None = typer.Option(None, help="model width [default: TrainConfig's]"),
    dropout: float | None = typer.Option(None, help="[default: TrainConfig's]"),
    weight_decay: float | None = typer.Option(None, help="AdamW [default: TrainConfig's]"),
    future_weight: float | None = typer.Option(
        None, help="> 0: also predict items 2..window ahead [default: TrainConfig's]"
    ),
    future_window: int | None = typer.Option(None, help="[default: TrainConfig's]"),
    crop_weight: float | None = typer.Option(
        None, help="> 0: also train on 1..3-event histories cut from the windows [default: TrainConfig's]"
    ),
    serve_len: int | None = typer.Option(None, help="inference reads the newest N events [default: TrainConfig's]"),
    ease_neighbours: int | None = typer.Option(None, help="EASE as top-N neighbours, 0 = dense [TrainConfig's]"),
    device: str = typer.Option("auto", help="auto = cuda when present, else cpu"),
) -> None:
    """Train the interest Transformer: checkpoint.pt, vocab.json, categories.json, metrics.json, train_curve.png."""
    import json

    from models.train import TrainConfig, train

    tuning = {"d_model": d_model, "dropout": dropout, "weight_decay": weight_decay}
    tuning |= {"future_weight": future_weight, "future_window": future_window, "crop_weight": crop_weight}
    tuning |= {"serve_len": serve_len, "ease_neighbours": ease_neighbours}
    overrides = {k: v for k, v in tuning.items() if v is not None}  # unset: the dataclass's defaults, kept in one place
    cfg = TrainConfig(
        dataset=dataset,
        seed=seed,
        max_epochs=max_epochs,
        max_minutes=max_minutes,
        use_fusion=fusion,
        use_session_pos=session_pos,
        use_time_gaps=time_gaps,
        device=device,
        **overrides,
    )
    ckpt, _ = train(cfg, out=out)
    meta = ckpt.metadata
    typer.echo(f"{out}: {meta['epochs']} epochs in {meta['train_seconds']} s on {meta['device']}")
    served = meta["item_item"].get("val_ndcg10", meta["best_val_ndcg10"])  # no item-item scorer: the Transformer alone
    typer.echo(f"validation NDCG@10: {served:.4f} served, {meta['best_val_ndcg10']:.4f} Transformer alone")
    typer.echo(f"test: {json.dumps({k: round(v, 4) for k, v in meta['test_metrics'].items()})}")


def eval_command(
    seeds: int = typer.Option(3, help="seeds per neural variant (mean ± std)"),
    max_epochs: int = typer.Option(40, help="epoch cap per training run (early stopping usually ends sooner)"),
    max_minutes: float = typer.Option(8.0, help="wall-clock cap per training run (as `train`; 2 busy cores hit it)"),
    variant: list[str] = typer.Option([], help="variants to train (default: model, sasrec, sasrec_ease; see VARIANTS)"),
    out: Path = typer.Option(Path("artifacts/eval"), help="results.json (resumable: finished runs are kept)"),
    report: Path = typer.Option(Path("docs/model-results.md"), help="markdown report; the chart is written beside it"),
) -> None:
    """Next-item and next-session evaluation vs popularity, item-kNN, EASE, SASRec and ablations; RESULT last."""
    from models.evaluate import DEFAULT_VARIANTS, result_line, run, summary_lines

    variants = tuple(variant) or DEFAULT_VARIANTS
    summary = run(seeds, max_epochs, max_minutes, variants, out, report, log=typer.echo)
    for line in summary_lines(summary):
        typer.echo(line)
    typer.echo(f"report: {report}")
    typer.echo(result_line(summary))


def export_command(
    checkpoint: Path = typer.Option(Path("artifacts/model"), help="checkpoint dir written by `interest-stream train`"),
    out: Path = typer.Option(Path("artifacts/model_repository"), help="production Triton model repository"),
    twin: Path | None = typer.Option(None, help="CPU twin repository (python backend) [default: <out>-twin]"),
    version: int = typer.Option(1, help="Triton version directory to write; other versions are kept"),
    k: int = typer.Option(20, help="top items returned per user"),
    filter_seen: bool = typer.Option(True, help="rank items already in the history after all unseen items"),
    max_batch_size: int = typer.Option(1024, help="Triton max_batch_size (both repositories)"),
    preferred_batch_size: list[int] = typer.Option([128, 512, 1024], help="dynamic batching preferred sizes"),
    max_queue_delay_us: int = typer.Option(2000, help="dynamic batching max queue delay (microseconds)"),
    twin_threads: int = typer.Option(0, help="onnxruntime intra-op threads in the twin, 0 = min(4, cores)"),
) -> None:
    """Export a checkpoint to ONNX: a production Triton repository (GPU) and its local CPU twin."""
    from models.export import export_repository, verify_onnx
    from models.train import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    result = export_repository(
        ckpt,
        out,
        twin,
        version=version,
        k=k,
        filter_seen=filter_seen,
        max_batch_size=max_batch_size,
        preferred_batch_sizes=tuple(preferred_batch_size),
        max_queue_delay_us=max_queue_delay_us,
        twin_threads=twin_threads,
    )
    err = verify_onnx(ckpt.model, result.onnx_path, k=result.metadata["top_k"], filter_seen=filter_seen)
    diffs = ", ".join(f"{name} {e:.1e}" for name, e in err.items())
    name = result.metadata["model_version"]
    typer.echo(f"model.onnx: {result.onnx_path} (version {version}: {name}; onnx vs eager: {diffs})")
    typer.echo(f"production repository: {result.production}")
    typer.echo(f"CPU twin repository:   {result.twin}   (interest-stream triton --repo {result.twin})")


def refit_command(
    checkpoint: Path = typer.Option(Path("artifacts/model"), help="checkpoint dir written by `interest-stream train`"),
    out: Path = typer.Option(..., help="where to write the refitted checkpoint"),
    serve_len: int = typer.Option(50, help="inference reads the newest N events (0 = all)"),
    ease_neighbours: int = typer.Option(100, help="EASE as each item's top-N neighbours (0 = dense factors)"),
) -> None:
    """The same Transformer weights with other serving flags: the item-item scorer re-fitted on validation, tested."""
    import json

    from models.train import refit

    meta = refit(checkpoint, out, serve_len=serve_len, ease_neighbours=ease_neighbours).metadata
    typer.echo(f"{out}: validation NDCG@10 {meta['item_item'].get('val_ndcg10', float('nan')):.4f} served")
    typer.echo(f"test: {json.dumps({k: round(v, 4) for k, v in meta['test_metrics'].items()})}")
    typer.echo(f"item-item scorer: {json.dumps(meta['item_item'])}")
    lengths = " ".join(f"ndcg10_len{b.replace('+', 'plus')}={v:.4f}" for b, v in meta["test_by_length"].items())
    typer.echo(f"RESULT {lengths}")


def explain_check_command(
    checkpoint: Path = typer.Option(Path("artifacts/model"), help="checkpoint dir written by `interest-stream train`"),
    min_sessions: int = typer.Option(3, help="users with at least this many sessions in the encoded window"),
) -> None:
    """Do the explanation's session weights mean something? Masking and leave-one-session-out on the test users."""
    from models.explain import masking_check

    r = masking_check(str(checkpoint), min_sessions)
    typer.echo(f"{r.users} users, {r.mean_sessions:.1f} sessions each in the window")
    typer.echo(f"1 - cos after removing the top-weighted session {r.shift_top:.4f}, a random one {r.shift_random:.4f}, "
               f"the lowest-weighted {r.shift_low:.4f}")  # fmt: skip
    typer.echo(
        f"RESULT shift_top={r.shift_top:.4f} shift_low={r.shift_low:.4f} shift_random={r.shift_random:.4f} "
        f"top_beats_low={r.top_beats_low:.3f} spearman_vs_loso={r.spearman_vs_loso:.3f} "
        f"top_is_loso_top={r.top_is_loso_top:.3f} top_is_latest={r.top_is_latest:.3f}"
    )


def eval_scenarios_command(
    users: int = typer.Option(400, help="synthetic users with a planted per-scenario taste"),
    seed: int = typer.Option(0),
    max_epochs: int = typer.Option(40),
) -> None:
    """Scenario-aware interest on planted data: next-session Recall@20 asked about the session's scenario vs not."""
    from models.scenarios import run

    r = run(users, seed, max_epochs)
    typer.echo(
        f"RESULT recall20_asked={r.recall20_asked:.4f} recall20_general={r.recall20_general:.4f} "
        f"recall20_wrong={r.recall20_wrong:.4f} planted_share_asked={r.planted_share_asked:.3f} "
        f"planted_share_general={r.planted_share_general:.3f} users={r.users}"
    )


def eval_stream_command(
    out: Path = typer.Option(Path("artifacts/eval-stream"), help="results.json, the plot, the model before T (reused)"),
    cut: float = typer.Option(0.8, help="share of events (by time) before T; the rest is streamed"),
    updates: int = typer.Option(10, help="trainer intervals over the stream (equal event counts)"),
    steps: int = typer.Option(100, help="fine-tuning steps per update"),
    max_eval_events: int = typer.Option(0, help="> 0: score an evenly spaced subsample of the streamed events"),
    max_epochs: int = typer.Option(40, help="training before T"),
    max_minutes: float = typer.Option(8.0, help="training before T: wall-clock cap"),
    holdout: float = typer.Option(0.2, help="each interval's newest share held out by the learner"),
    fusion_share: float = typer.Option(0.5, help="of which the oldest share refits the fusion (0: training's kept)"),
    seed: int = typer.Option(0),
) -> None:
    """MovieLens replayed in time order: frozen vs continuously updated model vs refitted EASE vs popularity."""
    from models.stream_eval import StreamEvalConfig, result_line, run

    cfg = StreamEvalConfig(cut=cut, updates=updates, steps=steps, max_eval_events=max_eval_events, holdout=holdout)
    cfg.max_epochs, cfg.max_minutes, cfg.seed, cfg.fusion_share = max_epochs, max_minutes, seed, fusion_share
    summary = run(cfg, out, log=typer.echo)
    typer.echo(f"results: {out / 'results.json'}, plot: {out / 'ndcg_over_time.png'}")
    typer.echo(result_line(summary))
