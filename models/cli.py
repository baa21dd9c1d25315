"""Model commands (train, eval, export). Torch is imported inside each command, never at module load."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Attach the model commands to the `interest-stream` CLI."""
    app.command("export")(export_command)


def export_command(
    checkpoint: Path = typer.Option(Path("artifacts/model"), help="checkpoint dir written by `interest-stream train`"),
    out: Path = typer.Option(Path("artifacts/model_repository"), help="production Triton model repository"),
    twin: Path | None = typer.Option(None, help="CPU twin repository (python backend) [default: <out>-twin]"),
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
        k=k,
        filter_seen=filter_seen,
        max_batch_size=max_batch_size,
        preferred_batch_sizes=tuple(preferred_batch_size),
        max_queue_delay_us=max_queue_delay_us,
        twin_threads=twin_threads,
    )
    err = verify_onnx(ckpt.model, result.onnx_path, k=result.metadata["top_k"], filter_seen=filter_seen)
    diffs = ", ".join(f"{name} {e:.1e}" for name, e in err.items())
    typer.echo(f"model.onnx: {result.onnx_path} (version {result.metadata['model_version']}; onnx vs eager: {diffs})")
    typer.echo(f"production repository: {result.production}")
    typer.echo(f"CPU twin repository:   {result.twin}   (interest-stream triton --repo {result.twin})")
