"""Worker settings, read from environment variables (or a `.env` file) and CLI flags.

Every field maps to one upper-case environment variable of the same name (`kafka_bootstrap_servers` ->
`KAFKA_BOOTSTRAP_SERVERS`). A variable that looks like a setting but is none is a typo the settings would drop
without a word (`WORKER_BACH_MAX=500` leaves the batch at 1000), so the worker refuses to start on one:
`unknown_variables` names every variable with a settings prefix (`ENV_PREFIXES`) that is no field, with the
closest field. The deployment files are checked against the same list by the tests.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.sessions import SessionConfig


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # --- Kafka connection: any Kafka-protocol broker (Apache Kafka in production, noida-db locally).
    kafka_bootstrap_servers: str = "localhost:9092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None

    # --- Topics. The DLQ is always `<topic_events>-dlq`.
    app_id: str = "interest-stream"
    topic_events: str = "user-events"
    topic_output: str = "user-interests"
    topic_partitions: int = Field(8, ge=1, le=1024)
    topic_replication_factor: int = Field(1, ge=1)

    # --- Event contract limits.
    event_max_bytes: int = Field(16 * 1024, ge=256)
    event_envelope_max_bytes: int = Field(1_000_000, ge=1024, description="a batch envelope (JSON array of events)")
    event_max_future_s: float = Field(600.0, ge=0, description="reject event times this far past the clock")
    # A DLQ record carries at most this much of the original value (headers: original size and sha256), so a
    # message too large for the producer cannot fail its batch.
    dlq_max_value_bytes: int = Field(64 * 1024, ge=1024, le=900_000)

    # --- Sessionization and state bounds.
    session_gap_s: float = Field(1800.0, gt=0)
    session_lateness_s: float = Field(3600.0, ge=0)
    state_max_events: int = Field(200, ge=1)
    state_max_sessions: int = Field(20, ge=1)
    state_max_ids: int = Field(2000, ge=0, description="evicted event ids remembered to drop duplicates")
    state_dir: Path = Path(".local/state")

    # --- Triton inference server (gRPC).
    triton_url: str = ""  # host:port of Triton's gRPC endpoint; empty = ingest only (state, no inference)
    triton_model: str = "interest_transformer"
    # Empty: the newest ready version that matches the encoder, switched between batches (stream/versions.py);
    # set: only that version.
    triton_model_version: str = ""
    model_poll_s: float = Field(5.0, gt=0, description="how often the worker looks for a new served model version")
    triton_timeout_s: float = Field(5.0, gt=0)
    triton_retry_max_s: float = Field(2.0, gt=0, description="cap of the exponential retry back-off")
    triton_circuit_failures: int = Field(5, ge=1)
    triton_circuit_reset_s: float = Field(10.0, gt=0)
    triton_ssl: bool = False
    triton_ssl_root_certificates: Path | None = None
    triton_ssl_private_key: Path | None = None
    triton_ssl_certificate_chain: Path | None = None
    # The served model's directory: each version's vocab, categories and metadata in <version>/ (or beside config).
    model_dir: Path = Path("artifacts/model_repository/interest_transformer")

    # --- Worker runtime.
    worker_web_port: int = Field(6066, ge=0, le=65535)
    worker_web_host: str = "0.0.0.0"
    worker_batch_max: int = Field(1000, ge=1)
    # A batch is handed to the agent this long after its first event (or at WORKER_BATCH_MAX events); an idle worker
    # does not wake for it (stream/batching.py). 20 ms: lower live latency than 50 ms, at equal throughput
    # (docs/benchmarks.md, "Live"); 10 ms made the batches too small for Triton at 500 ev/s.
    worker_batch_wait_s: float = Field(0.02, gt=0)
    # Batches in flight (stream/overlap.py): 2 folds the next batch while one waits for Triton and the acks;
    # 1 is the serial step (fold, infer, write, send, then the next batch).
    worker_batches_in_flight: int = Field(2, ge=1, le=8)
    # Producer linger: without it every changelog/output write of a batch went out as its own produce request
    # (the ingest profile showed ~1 request per write, ~11 % of the worker's time); a few ms coalesces them.
    worker_producer_linger_ms: int = Field(5, ge=0, le=1000)
    worker_log_level: str = "info"
    # Bytes one fetch takes from a partition. Small, so a partition with a large backlog (one user sending 100k
    # events) delays the others by one small fetch (Faust interleaves fetched partitions round-robin).
    worker_max_partition_fetch_bytes: int = Field(64 * 1024, ge=1024)
    worker_max_poll_records: int = Field(1000, ge=1, description="records per consumer poll (bounded: see app.py)")
    worker_max_poll_interval_s: float = Field(1000.0, gt=0, description="a worker not polling this long leaves")
    # SIGTERM ends the worker within this many seconds, also with a batch stuck forever (stream/worker.py); keep it
    # below the pod's terminationGracePeriodSeconds (60 in deploy/k8s).
    worker_shutdown_deadline_s: float = Field(30.0, gt=0, description="a stop that takes longer exits hard")
    worker_standby_replicas: int = Field(1, ge=0, description="Faust standby copies of each table partition")
    metrics_port: int = Field(9108, ge=0, le=65535)
    # /health says degraded once a batch takes longer than this: within ~3.5 s of a Triton hang (issue 11: <= 5 s).
    health_stall_s: float = Field(3.0, gt=0, description="/health is degraded once a batch takes longer than this")

    @property
    def topic_dlq(self) -> str:
        return f"{self.topic_events}-dlq"

    def session_config(self) -> SessionConfig:
        return SessionConfig(
            gap_ms=round(self.session_gap_s * 1000),
            lateness_ms=round(self.session_lateness_s * 1000),
            max_events=self.state_max_events,
            max_sessions=self.state_max_sessions,
            max_ids=self.state_max_ids,
        )

    def kafka_client_kwargs(self) -> dict[str, object]:
        """Connection keywords shared by every aiokafka client the project makes."""
        kwargs: dict[str, object] = {
            "bootstrap_servers": self.kafka_bootstrap_servers,
            "security_protocol": self.kafka_security_protocol,
        }
        if self.kafka_sasl_mechanism:
            kwargs["sasl_mechanism"] = self.kafka_sasl_mechanism
            kwargs["sasl_plain_username"] = self.kafka_sasl_username
            kwargs["sasl_plain_password"] = (
                self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None
            )
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            kwargs["ssl_context"] = create_ssl_context(
                cafile=str(self.kafka_ssl_cafile) if self.kafka_ssl_cafile else None,
                certfile=str(self.kafka_ssl_certfile) if self.kafka_ssl_certfile else None,
                keyfile=str(self.kafka_ssl_keyfile) if self.kafka_ssl_keyfile else None,
            )
        return kwargs

    def faust_credentials(self) -> Any:
        """The same SASL / TLS settings as Faust credentials (None for PLAINTEXT)."""
        import faust

        kwargs = self.kafka_client_kwargs()
        ssl_context = kwargs.get("ssl_context")
        if self.kafka_sasl_mechanism:
            return faust.SASLCredentials(
                username=self.kafka_sasl_username,
                password=kwargs["sasl_plain_password"],
                mechanism=self.kafka_sasl_mechanism,
                ssl_context=ssl_context,
            )
        if ssl_context is not None:
            return faust.SSLCredentials(ssl_context)
        return None


#: The first words of the fields: a variable starting with one of them is meant for the worker. `APP_` (app_id)
#: is left out: platforms set APP_* variables of their own (APP_ENV, APP_NAME); tests/test_settings_env.py checks
#: that every other field is covered.
ENV_PREFIXES: Final = (
    "KAFKA_", "TOPIC_", "EVENT_", "DLQ_", "SESSION_", "STATE_", "TRITON_", "MODEL_", "WORKER_", "METRICS_", "HEALTH_",
)  # fmt: skip
#: Kubernetes injects these for every Service of the namespace (a Service `triton` gives TRITON_SERVICE_HOST,
#: TRITON_PORT=tcp://..., TRITON_PORT_8001_TCP_ADDR, ...): never settings, never refused.
_SERVICE_LINK = re.compile(r"\w+_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_(ADDR|PORT|PROTO))?)?)")


class UnknownSetting(ValueError):
    """The environment holds a variable named like a setting that is none (a typo would be silently ignored)."""


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line per variable with a settings prefix that is no setting, naming the closest setting if any.
    Case-insensitive, as the settings read them."""
    fields = sorted(name.upper() for name in Settings.model_fields)
    found = []
    for name in sorted(environ):
        upper = name.upper()
        if upper in fields or not upper.startswith(ENV_PREFIXES) or _SERVICE_LINK.fullmatch(upper):
            continue
        close = difflib.get_close_matches(upper, fields, n=1, cutoff=0.6)
        found.append(f"{name} is not a setting" + (f" (did you mean {close[0]}?)" if close else ""))
    return found


def check_environment(environ: Mapping[str, str]) -> None:
    """Raise `UnknownSetting` naming every unknown variable with a settings prefix (see `unknown_variables`)."""
    if found := unknown_variables(environ):
        raise UnknownSetting(
            "; ".join(found) + f". Variables starting with {', '.join(ENV_PREFIXES)} are read as settings: each must "
            "be a field of stream/settings.py (docs/operations.md, Settings)."
        )
