"""The web UIs: ``mlflow server`` on the tracking store and ``optuna-dashboard`` on the Optuna storage.

Both servers run as child processes, each in its own process group, so that a stop reaches every
worker process they fork. ``research ui`` wraps these commands::

    MLFLOW_BACKEND_STORE_URI=URI mlflow server --host 127.0.0.1 --port 5000 --workers 1
    optuna-dashboard STORAGE --host 127.0.0.1 --port 8080
"""

from __future__ import annotations

import logging
import os
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from research.optimize import journal_path, sqlite_path
from research.tracking import redact_url

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MLFLOW_PORT = 5000
DEFAULT_OPTUNA_PORT = 8080
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 10.0


class UiError(RuntimeError):
    """A server could not start because of a port in use, a missing program or an early exit, named in the message."""


@dataclass
class Server:
    """One web server running as a child process."""

    name: str
    command: list[str]
    url: str
    health_path: str
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    _log_file: object = field(default=None, repr=False)

    @property
    def health_url(self) -> str:
        return self.url.rstrip("/") + self.health_path


def default_tracking_uri() -> str:
    """Return the tracking URI MLflow itself uses: ``MLFLOW_TRACKING_URI``, else its local default."""
    return mlflow.get_tracking_uri()


def experiment_urls(tracking_uri: str, mlflow_url: str) -> dict[str, str]:
    """Map each active experiment's name to its runs table in the MLflow UI.

    NOTE: MLflow 3.17's UI opens experiments in its GenAI view (traces) until the user picks
    "Model training" once; ``workflowType=machine_learning`` in the URL selects the runs table.
    """
    client = MlflowClient(tracking_uri)
    base = mlflow_url.rstrip("/")
    return {
        experiment.name: f"{base}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
        for experiment in client.search_experiments()
    }


def console_script(name: str) -> str:
    """Find a console script of this Python environment, such as ``mlflow``, falling back to ``PATH``.

    Raises:
        UiError: The program is installed neither beside this interpreter nor on ``PATH``.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise UiError(f"Program '{name}' not found beside {sys.executable} nor on PATH; install it with: pip install -e .")
    return found


def mlflow_server(tracking_uri: str, host: str, port: int) -> Server:
    """Describe ``mlflow server`` on ``tracking_uri``, with one worker process."""
    # One worker serves one person's browser; mlflow's default is 4, each of about 250 MB resident.
    command = [console_script("mlflow"), "server", "--host", host, "--port", str(port), "--workers", "1"]
    env = {
        # Read by --backend-store-uri; in the environment, a database password stays out of `ps`.
        "MLFLOW_BACKEND_STORE_URI": tracking_uri,
        # MLflow 3.17 starts six job-runner processes for GenAI features by default, and browsing
        # runs needs none of them. An explicit setting in the environment still wins.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
    }
    return Server("MLflow", command, f"http://{_url_host(host)}:{port}/", "/health", env)


def optuna_dashboard(storage: str, host: str, port: int) -> Server:
    """Describe ``optuna-dashboard`` on the Optuna ``storage`` URL or journal file.

    optuna-dashboard reads a journal file from its plain path, so ``journal://PATH`` becomes ``PATH``.
    """
    journal = journal_path(storage)
    target = str(journal) if journal is not None else storage
    # NOTE: optuna-dashboard 0.21 takes the storage only as an argument, so the password of a
    # postgresql:// URL shows in the process list of this machine.
    command = [console_script("optuna-dashboard"), target, "--host", host, "--port", str(port), "--quiet"]
    return Server("optuna-dashboard", command, f"http://{_url_host(host)}:{port}/dashboard/", "/api/meta")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def check_tracking_store(tracking_uri: str) -> None:
    """Reject a tracking URI that names a server, not a store that ``mlflow server`` can open.

    Raises:
        UiError: The URI is an ``http(s)://`` or ``databricks`` tracking server.
    """
    scheme = tracking_uri.split(":", 1)[0].lower()
    if scheme in ("http", "https", "databricks"):
        raise UiError(
            f"Tracking URI {redact_url(tracking_uri)} is a tracking server, which has its own UI: open it in a "
            "browser, or pass a store such as --tracking-uri sqlite:///mlflow.db to serve that store."
        )


def check_storage_exists(storage: str) -> None:
    """Reject an Optuna SQLite or journal file that does not exist yet.

    optuna-dashboard 0.21 opens an SQLite storage without creating its tables, so it fails on a new
    file. A missing file usually means that the command runs in another folder than the sweep did.

    Raises:
        UiError: The storage's file does not exist.
    """
    path = sqlite_path(storage) or journal_path(storage)
    if path is not None and not path.is_file():
        raise UiError(
            f"Optuna storage file {path.resolve()} not found. Run a sweep first (research sweep or mlflow run), "
            "start research ui in the folder the sweep ran in, or pass the sweep's storage with --storage."
        )


def check_port_free(host: str, port: int, option: str) -> None:
    """Bind ``host:port`` once to find a port already in use before a server fails on it.

    Raises:
        UiError: The port is in use or the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As the servers do, so that connections in TIME_WAIT from a previous run do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UiError(f"Cannot listen on {host}:{port} ({error.strerror}); choose another port with {option}.") from None


def start(server: Server, log_dir: Path) -> None:
    """Start ``server`` in its own process group, its output going to a log file in ``log_dir``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    server.log_path = log_dir / f"{server.name.lower()}.log"
    server._log_file = server.log_path.open("wb")
    server.process = subprocess.Popen(
        server.command, stdin=subprocess.DEVNULL, stdout=server._log_file, stderr=subprocess.STDOUT,
        env={**os.environ, **server.env}, start_new_session=True,
    )
    log.info("Started %s (pid %d), output in %s.", server.name, server.process.pid, server.log_path)


def wait_ready(server: Server, timeout: float = START_TIMEOUT_SECONDS, cancel: threading.Event | None = None) -> None:
    """Poll the server's health URL until it responds with HTTP 200, or until ``cancel`` is set.

    Raises:
        UiError: The process exited, or no response came within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (cancel is not None and cancel.is_set()):
        if server.process.poll() is not None:
            raise UiError(f"{server.name} exited with code {server.process.returncode} while starting: {_log_tail(server)}")
        try:
            with urllib.request.urlopen(server.health_url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    if cancel is not None and cancel.is_set():
        return
    raise UiError(f"{server.name} did not respond at {server.health_url} within {timeout:.0f} s: {_log_tail(server)}")


def _log_tail(server: Server, lines: int = 15) -> str:
    if server.log_path is None or not server.log_path.is_file():
        return "no output"
    text = server.log_path.read_text(errors="replace").strip().splitlines()
    return "\n".join(text[-lines:]) or "no output"


def stop(server: Server, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
    """Send SIGTERM to the server's process group, then SIGKILL after ``timeout`` seconds."""
    process = server.process
    if process is None:
        return
    if process.poll() is None:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) still running %.0f s after SIGTERM; sending SIGKILL.", server.name, process.pid, timeout)
            _signal_group(process.pid, signal.SIGKILL)
            process.wait()
    # Workers forked by the server share its process group and may outlive the leader.
    _signal_group(process.pid, signal.SIGKILL)
    if server._log_file is not None:
        server._log_file.close()
    log.info("Stopped %s (pid %d, exit code %s).", server.name, process.pid, process.returncode)


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


@contextmanager
def running(servers: list[Server], log_dir: Path, cancel: threading.Event | None = None) -> Iterator[list[Server]]:
    """Start every server, wait until each responds, and stop them all on exit, in reverse order.

    A set ``cancel`` event cuts the wait short, so a stop request during startup is not delayed.
    """
    started: list[Server] = []
    try:
        for server in servers:
            start(server, log_dir)
            started.append(server)
        for server in servers:
            wait_ready(server, cancel=cancel)
        yield servers
    finally:
        for server in reversed(started):
            stop(server)


class StopRequest(threading.Event):
    """An event set by SIGINT or SIGTERM; ``signal_name`` is the first signal received."""

    signal_name: str = ""


@contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """Turn SIGINT and SIGTERM into a set event while the block runs, then restore the previous handlers."""
    request = StopRequest()

    def handle(signum: int, _frame) -> None:
        request.signal_name = request.signal_name or signal.Signals(signum).name
        request.set()

    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def wait_until_stopped(servers: list[Server], stop_event: threading.Event, poll_seconds: float = 0.5) -> Server | None:
    """Block until ``stop_event`` is set or a server exits; return the server that exited, if any."""
    while not stop_event.wait(poll_seconds):
        for server in servers:
            if server.process.poll() is not None:
                return server
    return None


def serve(
    tracking_uri: str,
    storage: str,
    host: str = DEFAULT_HOST,
    mlflow_port: int = DEFAULT_MLFLOW_PORT,
    optuna_port: int = DEFAULT_OPTUNA_PORT,
    log_dir: Path | None = None,
    on_ready: Callable[[list[Server]], None] | None = None,
) -> int:
    """Run both UIs until Ctrl-C or SIGTERM, or until one of them exits; return the exit code.

    The servers' output goes to files in ``log_dir`` (default: a new temporary folder).

    Raises:
        UiError: A port is in use, a program is missing, or a server did not start.
    """
    check_tracking_store(tracking_uri)
    check_storage_exists(storage)
    if mlflow_port == optuna_port:
        raise UiError(f"--mlflow-port and --optuna-port are both {mlflow_port}; give the two servers different ports.")
    check_port_free(host, mlflow_port, "--mlflow-port")
    check_port_free(host, optuna_port, "--optuna-port")
    servers = [mlflow_server(tracking_uri, host, mlflow_port), optuna_dashboard(storage, host, optuna_port)]
    log.info("MLflow tracking store %s; Optuna storage %s.", redact_url(tracking_uri), redact_url(storage))

    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="research-ui-"))

    with stop_signals() as request, running(servers, log_dir, cancel=request):
        if not request.is_set() and on_ready is not None:
            on_ready(servers)
        exited = wait_until_stopped(servers, request)
        if exited is not None:
            log.error("%s exited with code %s: %s", exited.name, exited.process.returncode, _log_tail(exited))
            return 1
        log.info("Received %s; stopping the servers.", request.signal_name)
    return 0
