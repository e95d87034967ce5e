"""research.ui and ``research ui``: start both servers on 127.0.0.1 and stop every process they started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import psutil
import pytest

from research import ui
from tests.conftest import REPO_ROOT

CLI_START_TIMEOUT_SECONDS = 120


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as client:
        client.settimeout(1)
        return client.connect_ex(("127.0.0.1", port)) == 0


def _read_until(process: subprocess.Popen, marker: str, timeout: float) -> list[str]:
    """Read stdout lines until one contains ``marker``; fail with stderr when the process ends first."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            pytest.fail(f"research ui exited with {process.wait()} before printing {marker!r}: {process.stderr.read()[-3000:]}")
        lines.append(line.rstrip())
        if marker in line:
            return lines
    pytest.fail(f"research ui printed no {marker!r} within {timeout} s; output so far: {lines}")


def test_cli_serves_and_stops(tmp_path: Path) -> None:
    optuna.create_study(study_name="ui-test", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    mlflow_port, optuna_port = _free_port(), _free_port()
    command = [
        sys.executable, "-m", "research", "ui",
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
        "--mlflow-port", str(mlflow_port), "--optuna-port", str(optuna_port),
    ]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={
        **os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "200",
    })
    try:
        lines = _read_until(process, "Ctrl-C", CLI_START_TIMEOUT_SECONDS)
        servers = psutil.Process(process.pid).children(recursive=True)

        assert f"MLflow: http://127.0.0.1:{mlflow_port}/" in lines
        assert f"optuna-dashboard: http://127.0.0.1:{optuna_port}/dashboard/" in lines
        assert any("#/experiments/0/runs?workflowType=machine_learning" in line for line in lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{mlflow_port}/health", timeout=10) as response:
            assert response.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{optuna_port}/api/studies", timeout=10) as response:
            assert response.status == 200
        assert len(servers) >= 2

        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        _, stderr = process.communicate()
    finally:
        if process.poll() is None:
            process.kill()

    assert code == 0, stderr[-3000:]
    assert "Received SIGTERM" in stderr
    assert not _port_open(mlflow_port)
    assert not _port_open(optuna_port)
    still_running = [p.pid for p in servers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert still_running == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_stop_signals_set_request(signum: signal.Signals) -> None:
    before = signal.getsignal(signum)

    with ui.stop_signals() as request:
        signal.raise_signal(signum)
        assert request.wait(timeout=5)
        assert request.signal_name == signum.name

    assert signal.getsignal(signum) is before


def test_wait_returns_exited_server(tmp_path: Path) -> None:
    server = ui.Server("short", [sys.executable, "-c", "pass"], "http://127.0.0.1:1/", "/health")
    ui.start(server, tmp_path)

    exited = ui.wait_until_stopped([server], ui.StopRequest(), poll_seconds=0.1)
    ui.stop(server)

    assert exited is server
    assert server.process.returncode == 0


def test_missing_storage_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(ui.UiError, match=r"optuna\.db not found.*--storage"):
        ui.serve(f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}")
    with pytest.raises(ui.UiError, match=r"journal\.log not found"):
        ui.serve(f"sqlite:///{tmp_path / 'mlflow.db'}", f"journal://{tmp_path / 'journal.log'}")


def test_tracking_server_uri_rejected(tmp_path: Path) -> None:
    with pytest.raises(ui.UiError, match=r"http://127\.0\.0\.1:5000 is a tracking server"):
        ui.serve("http://127.0.0.1:5000", f"sqlite:///{tmp_path / 'optuna.db'}")


def test_port_in_use_rejected(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="ui-test", storage=storage)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        with pytest.raises(ui.UiError, match=rf"127\.0\.0\.1:{port} .*--mlflow-port"):
            ui.serve(f"sqlite:///{tmp_path / 'mlflow.db'}", storage, mlflow_port=port, optuna_port=_free_port())


def test_server_exit_during_start(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "import sys; print('cannot open the store'); sys.exit(3)"]
    server = ui.Server("broken", command, f"http://127.0.0.1:{_free_port()}/", "/health")

    ui.start(server, tmp_path)
    with pytest.raises(ui.UiError, match="exited with code 3") as error:
        ui.wait_ready(server, timeout=30)
    ui.stop(server)

    assert "cannot open the store" in str(error.value)


def test_stop_reaches_forked_workers(tmp_path: Path) -> None:
    # The leader forks a worker, like mlflow server starting uvicorn, then ignores SIGTERM.
    script = (
        "import signal, subprocess, sys, time\n"
        "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        "print(worker.pid, flush=True)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "time.sleep(300)\n"
    )
    server = ui.Server("stubborn", [sys.executable, "-c", script], "http://127.0.0.1:1/", "/health")
    ui.start(server, tmp_path)
    deadline = time.monotonic() + 30
    while not server.log_path.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.1)
    worker = psutil.Process(int(server.log_path.read_text().split()[0]))

    ui.stop(server, timeout=2)

    assert server.process.returncode == -signal.SIGKILL
    worker.wait(timeout=10)
    assert not worker.is_running()


def test_journal_storage_passed_as_path() -> None:
    server = ui.optuna_dashboard("journal:///data/optuna-journal.log", "127.0.0.1", 8080)

    assert server.command[1] == "/data/optuna-journal.log"
    assert server.url == "http://127.0.0.1:8080/dashboard/"


def test_mlflow_command_binds_loopback() -> None:
    server = ui.mlflow_server("sqlite:///mlflow.db", ui.DEFAULT_HOST, 5000)

    assert server.command[1:] == ["server", "--host", "127.0.0.1", "--port", "5000", "--workers", "1"]
    assert server.env["MLFLOW_BACKEND_STORE_URI"] == "sqlite:///mlflow.db"
    assert server.env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_same_port_rejected(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="ui-test", storage=storage)

    with pytest.raises(ui.UiError, match="both 5000"):
        ui.serve(f"sqlite:///{tmp_path / 'mlflow.db'}", storage, mlflow_port=5000, optuna_port=5000)


def test_default_tracking_uri(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert ui.default_tracking_uri() == "sqlite:///elsewhere.db"

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert ui.default_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
