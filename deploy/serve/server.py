"""`g2trt serve`: a real Triton Inference Server (the one nvidia-pytriton bundles) on a g2trt repository.

The bundled `tritonserver` (2.51) has the Python backend only, which is what a generation model runs
on (`deploy.serve.generate_model`); standard-backend models in the same repository (onnxruntime,
tensorrt: for NVIDIA's containers) are skipped with a note, by loading the generation models
explicitly (`--model-control-mode=explicit --load-model=...`).

Launch: a temporary backend folder `python/` holds links to the bundled libtriton_python.so, its
triton_python_backend_utils.py and the stub built for this Python (the stub must sit beside the
library); this venv's `bin` leads PATH (the stub finds its packages through `python3`), and PYTHONPATH
leads with the g2trt that launches it, so the server runs the same code.

Traps handled here: a stub that cannot start makes the server hang instead of failing, so readiness
(`/v2/health/ready`) is polled with a hard timeout and a server that exits while starting fails at once
with its first error line; stopping sends SIGTERM, waits `grace` seconds, then SIGKILLs the server's
whole process group (its stubs included); the Python backend's shared-memory regions get a prefix of
their own (`shm-region-prefix-name`), so the ones a killed server leaves behind are removed, and only
those.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from deploy.serve import triton_config as tc
from export.errors import G2trtError

SHM_DIR = Path("/dev/shm")
DEFAULT_SHM_PREFIX = "triton_python_backend_shm_region_"
INSTALL_HINT = "pip install 'g2trt[serve]'"


class ServeError(G2trtError, RuntimeError):
    """A server that cannot start (no serve extra, nothing to serve, a model that fails to load, no readiness)."""


@dataclasses.dataclass(frozen=True)
class TritonInstall:
    server: Path  # the tritonserver binary
    backend_lib: Path  # libtriton_python.so
    backend_utils: Path  # triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this Python
    libs: Path | None  # nvidia_pytriton.libs


def find_triton() -> TritonInstall:
    """The server nvidia-pytriton bundles (its Python API is not imported), or a one-line reason why not."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise ServeError(f"no Triton server: the serve extra is not installed ({INSTALL_HINT})")
    root = Path(spec.origin).parent / "tritonserver"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        server=root / "bin" / "tritonserver",
        backend_lib=root / "backends" / "python" / "libtriton_python.so",
        backend_utils=root / "backends" / "python" / "triton_python_backend_utils.py",
        stub=root / "python_backend_stubs" / python / "triton_python_backend_stub",
        libs=next(iter(sorted(root.parents[1].glob("nvidia_pytriton.libs"))), None),
    )
    for path in (install.server, install.backend_lib, install.backend_utils):
        if not path.is_file():
            raise ServeError(f"{path}: missing from the nvidia-pytriton install; reinstall it ({INSTALL_HINT})")
    if not install.stub.is_file():
        raise ServeError(f"{install.stub.parent.parent}: nvidia-pytriton has no Python-backend stub for {python}")
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        raise ServeError(
            f"numpy {numpy.__version__}: the Python-backend stub nvidia-pytriton bundles predates numpy 2 and "
            f"corrupts every tensor under it; install numpy<2 ({INSTALL_HINT} pins it)"
        )
    return install


def unavailable_reason() -> str | None:
    """Why `g2trt serve` cannot run here, or None."""
    try:
        find_triton()
    except ServeError as e:
        return str(e)
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def servable_models(repo: Path) -> tuple[list[str], list[str]]:
    """(generation models this server runs, standard-backend models it skips) in a checked repository."""
    from deploy.serve.package import validate_repository

    names = validate_repository(repo)
    python: list[str] = []
    other: list[str] = []
    for name in names:
        config = tc.parse((repo / name / "config.pbtxt").read_text(), str(repo / name / "config.pbtxt"))
        (python if config.backend == "python" else other).append(name)
    if not python:
        raise ServeError(
            f"{repo}: no generation model (only {', '.join(other)}: backends this server lacks); "
            "package with `g2trt package` to add one"
        )
    return python, other


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    http_port: int = 8000  # 0: a free port
    grpc_port: int = 8001
    metrics_port: int = 8002
    ready_timeout: float = 120.0
    grace: float = 10.0  # seconds between SIGTERM and SIGKILL
    models: tuple[str, ...] = ()  # default: every generation model in the repository


class TritonServer:
    """One tritonserver process on `repo`: `start()` returns once it is ready, `stop()` leaves nothing behind."""

    def __init__(
        self, repo: str | Path, options: ServerOptions = ServerOptions(), on_line: Callable[[str], None] | None = None
    ) -> None:
        self.repo = Path(repo).resolve()
        self.options = options
        self.on_line = on_line
        self.models, self.skipped = servable_models(self.repo)
        if options.models:
            unknown = [m for m in options.models if m not in self.models]
            if unknown:
                raise ServeError(f"{self.repo}: no generation model {unknown[0]!r} (has {', '.join(self.models)})")
            self.models = list(options.models)
        self.install = find_triton()
        self.host = options.host
        self.http_port = options.http_port or free_port(self.host)
        self.grpc_port = options.grpc_port or free_port(self.host)
        self.metrics_port = options.metrics_port or free_port(self.host)
        self.shm_prefix = f"g2trt_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self.lines: collections.deque[str] = collections.deque(maxlen=5000)
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_seconds = 0.0
        self._work: Path | None = None
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self, backends: Path) -> list[str]:
        o = self.options
        return [
            str(self.install.server),
            f"--model-repository={self.repo}",
            f"--backend-directory={backends}",
            "--model-control-mode=explicit",
            *[f"--load-model={m}" for m in self.models],
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=false",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--pinned-memory-pool-byte-size=0",
            "--cuda-memory-pool-byte-size=0:0",
            f"--exit-timeout-secs={max(1, int(o.grace) - 2)}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]

    def environment(self) -> dict[str, str]:
        import deploy

        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        g2trt_root = str(Path(deploy.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (g2trt_root, env.get("PYTHONPATH", "")) if p)
        if self.install.libs is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                p for p in (env.get("LD_LIBRARY_PATH", ""), str(self.install.libs)) if p
            )
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    def start(self) -> TritonServer:
        self._work = Path(tempfile.mkdtemp(prefix="g2trt-triton-"))
        backends = self._work / "backends"
        (backends / "python").mkdir(parents=True)
        for src in (self.install.backend_lib, self.install.backend_utils, self.install.stub):
            (backends / "python" / src.name).symlink_to(src)
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            self.command(backends),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.environment(),
            start_new_session=True,  # its own process group: Ctrl-C reaches us, and stop() kills the stubs too
        )
        self._reader = threading.Thread(target=self._read_log, name="tritonserver-log", daemon=True)
        self._reader.start()
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.ready_seconds = time.perf_counter() - started
        return self

    def _wait_ready(self, started: float) -> None:
        assert self.proc is not None
        deadline = started + self.options.ready_timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise ServeError(f"{self.repo}: tritonserver exited ({code}) while starting: {self.first_error()}")
            if self._ready():
                return
            time.sleep(0.1)
        raise ServeError(
            f"{self.repo}: tritonserver not ready after {self.options.ready_timeout:g} s "
            f"(stopped it); last log line: {self.last_line()}"
        )

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=1) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if self.on_line is not None:
                self.on_line(line)

    def first_error(self) -> str:
        """The first line that explains a failure: a model's load error, else any error, else the last line."""
        time.sleep(0.2)  # let the reader catch the last lines
        lines = list(self.lines)
        for pattern in (r"Failed to initialize|failed to load|load failed|Traceback|Error:|error:", r"^E\d{4} "):
            hit = next((ln for ln in lines if re.search(pattern, ln)), None)
            if hit is not None:
                return _trim(hit)
        return self.last_line()

    def last_line(self) -> str:
        lines = [ln for ln in self.lines if ln.strip()]
        return _trim(lines[-1]) if lines else "(no output)"

    def wait(self) -> int:
        """Block until the server exits by itself; its exit code."""
        assert self.proc is not None
        return self.proc.wait()

    def stop(self) -> None:
        """SIGTERM, `grace` seconds, SIGKILL to the whole process group; then its shared memory and temp files."""
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.options.grace)
                except subprocess.TimeoutExpired:
                    _kill_group(proc.pid)
                    proc.wait()
            _kill_group(proc.pid)  # any stub the server did not take down with it
            if self._reader is not None:
                self._reader.join(5)
        for region in leftover_regions(self.shm_prefix):
            with contextlib.suppress(OSError):
                region.unlink()
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def leftover_regions(prefix: str) -> list[Path]:
    return sorted(SHM_DIR.glob(f"{prefix}*")) if SHM_DIR.is_dir() else []


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _trim(line: str) -> str:
    """A log line without glog's prefix (`E1201 13:19:12.52 21867 file.cc:366] "...`) and quotes, on one line."""
    line = re.sub(r"^[IWEF]\d{4} [\d:.]+ +\d+ \S+\] ", "", line.strip())
    if len(line) > 1 and line[0] == line[-1] == '"':
        line = line[1:-1]
    return re.sub(r"\s+", " ", line).strip()[:400]


@contextlib.contextmanager
def serving(
    repo: str | Path, options: ServerOptions, on_line: Callable[[str], None] | None = None
) -> Iterator[TritonServer]:
    """A started server on `repo`, stopped (cleanly, or killed) when the block ends."""
    server = TritonServer(repo, options, on_line)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def serve_forever(
    server: TritonServer,
    on_ready: Callable[[TritonServer], None] | None = None,
    stop_signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM),
) -> None:
    """Start `server` and run until a stop signal (Ctrl-C, SIGTERM: a clean stop) or until it exits by
    itself (a `ServeError`). The handlers are in place before the server starts, so a signal during
    startup still stops it."""

    class _Stop(Exception):
        pass

    def handler(signum: int, frame: object) -> None:
        raise _Stop

    previous = {s: signal.signal(s, handler) for s in stop_signals}
    try:
        server.start()
        if on_ready is not None:
            on_ready(server)
        code = server.wait()
        raise ServeError(f"{server.repo}: tritonserver exited ({code}): {server.first_error()}")
    except (_Stop, KeyboardInterrupt):
        return
    finally:
        for s in stop_signals:  # a second Ctrl-C must not cut the cleanup short (stop() escalates by itself)
            signal.signal(s, signal.SIG_IGN)
        try:
            server.stop()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


EXAMPLE = '{"input_ids": [2, 9], "max_tokens": 8}'


def print_ready(server: TritonServer) -> None:
    from deploy import console as ui

    first = server.models[0]
    rows = [
        ("repository", str(server.repo)),
        ("models", ", ".join(server.models) + (f" (skipped: {', '.join(server.skipped)})" if server.skipped else "")),
        ("ready in", f"{server.ready_seconds:.1f} s"),
        ("HTTP", f"{server.url}/v2/models/{first}/generate, /generate_stream"),
        ("gRPC", f"{server.grpc_url} (streaming: ModelStreamInfer)"),
        ("metrics", f"{server.metrics_url} (g2trt_slots_busy, ...)"),
        ("try", f"curl -X POST {server.url}/v2/models/{first}/generate -d '{EXAMPLE}'"),
        ("stop", "Ctrl-C or SIGTERM"),
    ]
    ui.console.print(ui.table("g2trt serve", ["", ""], rows))
