"""End-to-end: a small tracked sweep, both UIs served by research.ui, and Debian's Chromium driven headless.

Screenshots go to ``test-artifacts/browser/`` at the repository root, also when a check fails.
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from research import ui
from research.sweep import SweepConfig, run_sweep
from tests.conftest import REPO_ROOT, make_tree

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = REPO_ROOT / "test-artifacts" / "browser"
# Pages render with React and fetch their data after load, which takes tens of seconds on 2 busy cores.
PAGE_TIMEOUT_SECONDS = 90
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1600,1000",
)

if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
    pytest.skip(
        f"Chromium or its driver not found ({CHROMIUM}, {CHROMEDRIVER}); install them with: apt-get install chromium chromium-driver",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing; install it with: pip install -e '.[dev]'")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@dataclass
class Session:
    """The tracked sweep, the two servers and the browser, shared by the tests of this module."""

    driver: object
    mlflow_url: str
    optuna_url: str
    experiment_url: str
    experiment_id: str
    parent_id: str
    children: list
    study_name: str
    study_id: int


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _make_driver(profile: Path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    # Passing the driver path keeps Selenium Manager from looking for, or downloading, a driver.
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)), options=options)


def _sweep(root: Path) -> dict:
    make_tree(root / "scene" / "train", ["coast", "forest", "kitchen"], 6)
    make_tree(root / "scene" / "test", ["coast", "forest", "kitchen"], 3, offset=500)
    config = SweepConfig(
        data_dir=str(root / "scene"), study="svm", n_trials=3, backbone="vgg16", weights="none", image_size=32,
        storage=f"sqlite:///{root / 'optuna.db'}", cache_dir=str(root / "cache"), experiment="browser-test",
        num_workers=0, batch_size=8,
    )
    return run_sweep(config)


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    root = tmp_path_factory.mktemp("browser")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    storage = f"sqlite:///{root / 'optuna.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        patch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        patch.chdir(root)
        result = _sweep(root)

        client = MlflowClient(tracking_uri)
        parent = client.get_run(result["parent_run_id"])
        children = client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
            order_by=["attributes.run_name ASC"],
        )
        study_id = optuna.load_study(study_name=result["study_name"], storage=storage)._study_id

        servers = [
            ui.mlflow_server(tracking_uri, "127.0.0.1", _free_port()),
            ui.optuna_dashboard(storage, "127.0.0.1", _free_port()),
        ]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        with ui.running(servers, root / "server-logs"):
            mlflow_server, dashboard = servers
            driver = _make_driver(Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=root)))
            try:
                yield Session(
                    driver=driver,
                    mlflow_url=mlflow_server.url,
                    optuna_url=dashboard.url,
                    experiment_url=ui.experiment_urls(tracking_uri, mlflow_server.url)["browser-test"],
                    experiment_id=parent.info.experiment_id,
                    parent_id=parent.info.run_id,
                    children=children,
                    study_name=result["study_name"],
                    study_id=study_id,
                )
            finally:
                driver.quit()
                for server in servers:
                    if server.log_path is not None:
                        shutil.copy(server.log_path, ARTIFACTS / server.log_path.name)


def _page_text(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def _wait_for_texts(driver, texts: list[str], screenshot: str, height: int = 1000, width: int = 1600) -> str:
    """Wait until the page shows every text, save a screenshot either way, and return the page text.

    MLflow scrolls inside its own panel, so a window of ``width`` x ``height`` pixels is what gets captured.
    """
    try:
        WebDriverWait(driver, PAGE_TIMEOUT_SECONDS, poll_frequency=0.5).until(
            lambda d: all(text in _page_text(d) for text in texts)
        )
    except TimeoutException:
        pass
    driver.set_window_size(width, height)
    time.sleep(1)  # The layout follows the new size after a repaint.
    driver.save_screenshot(str(ARTIFACTS / screenshot))
    driver.set_window_size(1600, 1000)
    return _page_text(driver)


def _close_assistant(driver) -> None:
    """Close MLflow's assistant side panel, which covers a third of the page on a first visit."""
    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label=Close]"):
        if button.is_displayed():
            button.click()


def _show_columns(driver, names: list[str]) -> None:
    """Tick param and metric columns in the runs table's "Columns" menu; MLflow 3.17 hides them by default."""
    menu = next(button for button in driver.find_elements(By.TAG_NAME, "button") if button.text.strip() == "Columns")
    menu.click()
    for name in names:
        WebDriverWait(driver, PAGE_TIMEOUT_SECONDS).until(
            lambda d: any(e.is_displayed() for e in d.find_elements(By.XPATH, f"//span[normalize-space(text())='{name}']"))
        )
        item = next(e for e in driver.find_elements(By.XPATH, f"//span[normalize-space(text())='{name}']") if e.is_displayed())
        item.click()
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)


def test_mlflow_experiment_page_lists_trials(session: Session) -> None:
    driver = session.driver
    driver.get(session.experiment_url)
    _wait_for_texts(driver, ["sweep svm vgg16"], "mlflow-experiment-collapsed.png")
    _close_assistant(driver)
    for expander in driver.find_elements(By.CSS_SELECTOR, "button[data-component-id*=runnamecellrenderer]"):
        expander.click()
    _show_columns(driver, ["svm_C", "val_accuracy", "train_accuracy"])
    names = [child.info.run_name for child in session.children]
    text = _wait_for_texts(driver, names, "mlflow-experiment.png", width=2000)
    headers = [header.text for header in driver.find_elements(By.CSS_SELECTOR, "[role=columnheader]")]

    assert "Runs" in text
    assert "sweep svm vgg16" in text
    for name in names:
        assert name in text
    for column in ("svm_C", "val_accuracy", "train_accuracy"):
        assert column in headers
    for child in session.children:
        assert child.data.params["svm_C"][:6] in text


def test_mlflow_parent_run_description(session: Session) -> None:
    driver = session.driver
    driver.get(f"{session.mlflow_url}#/experiments/{session.experiment_id}/runs/{session.parent_id}")
    text = _wait_for_texts(driver, ["RANDOM WEIGHTS", "best_svm_C"], "mlflow-parent-run.png")

    assert "RANDOM WEIGHTS" in text
    assert f"Optuna study {session.study_name}" in text
    assert "best_svm_C" in text
    assert "test_accuracy" in text


def test_mlflow_compare_two_trials(session: Session) -> None:
    driver = session.driver
    first, second = session.children[:2]
    query = urllib.parse.urlencode({
        "runs": json.dumps([first.info.run_id, second.info.run_id]),
        "experiments": json.dumps([first.info.experiment_id]),
    })
    driver.get(f"{session.mlflow_url}#/compare-runs?{query}")
    text = _wait_for_texts(driver, ["Comparing 2 Runs", "val_accuracy", first.info.run_name], "mlflow-compare.png", height=2200)

    assert "Comparing 2 Runs" in text
    assert first.info.run_name in text
    assert second.info.run_name in text
    for param in ("svm_C", "backbone", "weights", "image_size", "classifier", "seed"):
        assert param in text
    assert first.data.params["svm_C"] in text
    assert second.data.params["svm_C"] in text
    for metric in ("val_accuracy", "train_accuracy", "fit_seconds"):
        assert metric in text
    assert "optuna.study_name" in text
    assert "optuna.trial_number" in text


def test_optuna_dashboard_study_page(session: Session) -> None:
    driver = session.driver
    driver.get(f"{session.optuna_url}studies/{session.study_id}")
    text = _wait_for_texts(driver, [session.study_name, "svm_C"], "optuna-study.png", height=1800)

    assert session.study_name in text
    assert "svm_C" in text
    assert "val_accuracy" in text
    assert "Objective 0" not in text


def test_optuna_dashboard_trial_links_mlflow_run(session: Session) -> None:
    driver = session.driver
    driver.get(f"{session.optuna_url}studies/{session.study_id}/trials")
    run_id = next(child.info.run_id for child in session.children if child.data.tags["optuna.trial_number"] == "0")
    text = _wait_for_texts(driver, ["mlflow_run_id", run_id], "optuna-trials.png")

    assert "mlflow_run_id" in text
    assert run_id in text
    assert "svm_C" in text
