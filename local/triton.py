"""The real `tritonserver` bundled in nvidia-pytriton, run as a local process for tests, the demo and the CLI.

The wheel ships the server binary with the python backend only, and one backend stub per Python version. Triton
loads the stub from `<backend dir>/python/triton_python_backend_stub`, so `prepare()` builds that layout once (per
pytriton and Python version) under `.local/triton/`, the way pytriton itself does in its workspace. The stub embeds
*this* interpreter, so its libpython dir must come first in LD_LIBRARY_PATH and this venv's `bin` first in PATH
(that is how the stub finds numpy and onnxruntime). The server binds to 127.0.0.1 only, on given or free ports, and
is started and stopped by PID: SIGTERM (Triton drains in-flight requests, then exits), SIGKILL after a timeout.
`model_control="explicit"` runs Triton's explicit model control (`--load-model` per model at start-up): a new
version directory is picked up only when `load_model()` asks for it, as in production (docs/operations.md).

    with LocalTriton("artifacts/model_repository-twin") as triton:
        client = tritonclient.grpc.InferenceServerClient(triton.grpc_url)
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import sys
import sysconfig
import threading
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Literal

from local.process import ProcessError, Supervised, free_port

log = logging.getLogger(__name__)

DEFAULT_HOME = Path(".local/triton")
_HOST = "127.0.0.1"


@dataclass(frozen=True)
class TritonLayout:
    """A prepared server: the binary plus a backends dir that holds the python backend and this Python's stub."""

    binary: Path
    backend_dir: Path
    cache_dir: Path
    libs_dir: Path  # the wheel's bundled shared libraries (auditwheel's `nvidia_pytriton.libs`)


def _pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise RuntimeError("nvidia-pytriton is not installed: `pip install -e .[local]`")
    return Path(spec.origin).parent


def prepare(home: Path | str | None = None) -> TritonLayout:
    """Build (once) and return the server layout under `home`; safe to call from several processes at once."""
    src = _pytriton_root() / "tritonserver"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = src / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"nvidia-pytriton has no python backend stub for Python {py}")
    version = metadata.version("nvidia-pytriton")
    dest = Path(home or DEFAULT_HOME).resolve() / f"pytriton-{version}-py{py}"
    layout = TritonLayout(
        binary=dest / "bin" / "tritonserver",
        backend_dir=dest / "backends",
        cache_dir=dest / "caches",
        libs_dir=_pytriton_root().parent / "nvidia_pytriton.libs",
    )
    if (dest / ".complete").exists():
        return layout
    # Build in a private dir and rename: a concurrent prepare() either wins the rename or finds the complete one.
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
    shutil.copy2(stub, tmp / "backends" / "python" / "triton_python_backend_stub")
    (tmp / ".complete").write_text(json.dumps({"pytriton": version, "python": py}))
    try:
        tmp.rename(dest)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / ".complete").exists():
            raise
    log.info("prepared tritonserver %s for Python %s in %s", version, py, dest)
    return layout


def server_env(layout: TritonLayout) -> dict[str, str]:
    """Environment for the server and its stubs: this interpreter's libpython and venv first."""
    env = os.environ.copy()
    libpython_dir = sysconfig.get_config_var("LIBDIR") or ""
    paths = [libpython_dir, str(layout.libs_dir), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = ":".join(p for p in paths if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


class LocalTriton:
    """One tritonserver process serving `repo`; ports are chosen free unless given.

    `die_with_parent` ties the server to the *thread* that calls start() (Linux PDEATHSIG): start it from the main
    thread or another long-lived one, or pass False and rely on stop().
    """

    def __init__(
        self,
        repo: Path | str,
        *,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        models: list[str] | None = None,
        home: Path | str | None = None,
        log_file: Path | str | None = None,
        log_verbose: int = 0,
        ready_timeout_s: float = 120.0,
        die_with_parent: bool = True,
        model_control: Literal["none", "explicit"] = "none",
    ) -> None:
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise FileNotFoundError(f"model repository {self.repo} does not exist")
        self._fixed_ports = (http_port, grpc_port, metrics_port)
        self.http_port, self.grpc_port, self.metrics_port = 0, 0, 0
        self.models = models if models is not None else sorted(p.parent.name for p in self.repo.glob("*/config.pbtxt"))
        self.home = Path(home or DEFAULT_HOME)
        self.log_file = Path(log_file) if log_file else None
        self.log_verbose = log_verbose
        self.ready_timeout_s = ready_timeout_s
        self.die_with_parent = die_with_parent
        self.model_control = model_control
        self._proc: Supervised | None = None

    # --- endpoints
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def grpc_url(self) -> str:
        """host:port, the form `tritonclient.grpc.InferenceServerClient(url=...)` and Settings.triton_url take."""
        return f"{_HOST}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{_HOST}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_HOST}:{self.metrics_port}/metrics"

    # --- lifecycle
    def start(self) -> LocalTriton:
        """Start the server and block until every model in the repository is READY; raise (with the log) if not."""
        if self.is_alive():
            raise RuntimeError(f"tritonserver already running (pid {self.pid})")
        layout = prepare(self.home)
        attempts = 1 if all(self._fixed_ports) else 3  # free ports can be taken between probe and bind
        for attempt in range(1, attempts + 1):
            self._launch(layout)
            try:
                self._wait_ready()
                log.info("tritonserver pid %s ready: grpc %s http %s", self.pid, self.grpc_url, self.http_url)
                return self
            except RuntimeError as e:
                self.stop()
                if attempt == attempts or "address already in use" not in self.logs().lower():
                    raise RuntimeError(f"{e}; log {self.log_file}:\n{self.log_excerpt()}") from e
        raise AssertionError("unreachable")

    def _launch(self, layout: TritonLayout) -> None:
        http, grpc, metrics = self._fixed_ports
        taken: set[int] = set()
        for attr, port in zip(("http_port", "grpc_port", "metrics_port"), (http, grpc, metrics), strict=True):
            while port is None or port in taken:
                port = free_port()
            taken.add(port)
            setattr(self, attr, port)
        if self.log_file is None or not all(self._fixed_ports):
            logs = self.home.resolve() / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            self.log_file = self.log_file or logs / f"tritonserver-{self.grpc_port}.log"
        cmd = [
            str(layout.binary),
            f"--model-repository={self.repo}",
            f"--backend-directory={layout.backend_dir}",
            f"--cache-directory={layout.cache_dir}",
            f"--http-address={_HOST}",
            f"--http-port={self.http_port}",
            f"--grpc-address={_HOST}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={_HOST}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            # A per-server prefix: two servers on one host (tests next to the demo) must not share shm regions.
            f"--backend-config=python,shm-region-prefix-name=istream_{os.getpid()}_{self.grpc_port}_",
            f"--log-verbose={self.log_verbose}",
            "--exit-timeout-secs=10",
            f"--model-control-mode={self.model_control}",
            *(f"--load-model={m}" for m in (self.models if self.model_control == "explicit" else ())),
        ]
        self.log_file.unlink(missing_ok=True)  # one log per run: start() reads it for "address already in use"
        self._proc = Supervised(
            "tritonserver", cmd, self.log_file, env=server_env(layout), die_with_parent=self.die_with_parent
        ).start()

    def _wait_ready(self) -> None:
        assert self._proc is not None
        urls = [f"{self.http_url}/v2/health/ready"] + [f"{self.http_url}/v2/models/{m}/ready" for m in self.models]
        try:
            ready = lambda: all(_http_ok(u) for u in urls)  # noqa: E731
            self._proc.wait_until(ready, self.ready_timeout_s, f"ready ({self.models})")
        except ProcessError as exc:
            raise RuntimeError(str(exc).split("; log ")[0]) from exc

    def load_model(self, name: str, timeout_s: float = 120.0) -> None:
        """Explicit model control: (re)load `name` from the repository; returns once Triton says it is loaded.

        Triton loads the versions the model's version policy selects and keeps serving the loaded ones meanwhile;
        a failed load leaves them as they were and raises here with Triton's reason."""
        self._repository_call(f"models/{name}/load", timeout_s)

    def unload_model(self, name: str, timeout_s: float = 60.0) -> None:
        """Explicit model control: unload every version of `name` (in-flight requests finish first)."""
        self._repository_call(f"models/{name}/unload", timeout_s)

    def repository_index(self) -> list[dict[str, str]]:
        """Triton's repository index: one entry per model (and loaded version) with its state."""
        request = urllib.request.Request(f"{self.http_url}/v2/repository/index", data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def _repository_call(self, path: str, timeout_s: float) -> None:
        request = urllib.request.Request(f"{self.http_url}/v2/repository/{path}", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s):
                return
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise RuntimeError(f"tritonserver {path}: HTTP {exc.code} {detail}") from exc

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.alive

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (Triton drains, then stops its python stubs), wait up to `timeout_s`, then SIGKILL the group."""
        return self._proc.stop(timeout_s) if self._proc is not None else None

    def logs(self) -> str:
        try:
            return self.log_file.read_text(errors="replace") if self.log_file else ""
        except FileNotFoundError:
            return ""

    def log_excerpt(self, tail: int = 8) -> str:
        """The error lines (model load failures sit above a long status table) and the last few lines."""
        lines = self.logs().splitlines()
        errors = [ln for ln in lines if (ln[:1] == "E" and ln[1:5].isdigit()) or "error" in ln.lower()]
        return "\n".join(dict.fromkeys(errors[-20:] + lines[-tail:]))

    def __enter__(self) -> LocalTriton:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def serve_forever(self) -> int | None:
        """Block until SIGTERM/SIGINT (or the server dies), then stop it; for `interest-stream triton`."""
        stop = threading.Event()
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not stop.wait(0.5) and self.is_alive():
                pass
        finally:
            code = self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return code


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
