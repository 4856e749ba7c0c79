"""The quickstart notebook in a real browser: JupyterLab serves ``examples/quickstart.ipynb``, headless Chromium
runs all its cells through the Run menu, the training dashboard renders, its loss plot is redrawn while the status
line moves, and the saved notebook has no error output.

Needs the ``notebook`` and ``browser`` extras (ipywidgets, ipykernel, jupyterlab, selenium) and Debian's
``chromium`` and ``chromium-driver``; skips without them. Runs offline: chromedriver is found on ``PATH``, so
selenium-manager never downloads a browser. Set ``SMALLM_SCREENSHOT=path.png`` to keep a screenshot of the dashboard
taken mid-training.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"
SERVER_START_S = 120
# The dashboard must show training progress within this, counted from Run All (it took under two minutes here).
DASHBOARD_S = 8 * 60
# And the whole notebook must finish within this, counted from Run All: its training alone took 14 minutes on two
# cores shared with another job.
NOTEBOOK_S = 30 * 60
POLL_S = 0.5
# Enough to see the plot redrawn twice and the status line move twice.
PLOT_CHANGES = 2
STATUS_CHANGES = 2

# Each code cell's prompt text, as JupyterLab shows it: "[3]:" when run, "[*]:" while queued or running.
PROMPTS_JS = "return Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt'), e => e.textContent)"
DASHBOARD_JS = """
const root = document.querySelector('.smallm-dashboard');
if (!root) return null;
const text = (selector) => { const e = root.querySelector(selector); return e ? e.innerText.trim() : null; };
const plot = root.querySelector('img.smallm-plot');
return {plot: plot ? plot.getAttribute('src') : null, status: text('.smallm-status'), error: text('.smallm-error')};
"""


class NotebookRunFailed(Exception):
    """The run went wrong in a way the browser shows (the dashboard's error box)."""


@dataclass
class Lab:
    """A running JupyterLab server: its address, token and log file."""

    base_url: str
    token: str
    log: Path

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}?token={self.token}"

    def log_tail(self, lines: int = 60) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class DashboardWatch:
    """What the test saw of the dashboard: each distinct plot (its blob URL and a hash of how it looks) and each
    distinct status line, in order."""

    plots: list[tuple[str, str]] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)

    def enough(self) -> bool:
        return len(self.plots) > PLOT_CHANGES and len(self.statuses) > STATUS_CHANGES

    def describe(self) -> str:
        return f"{len(self.plots)} distinct plots, status lines seen: {self.statuses}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@contextmanager
def jupyter_lab(root: Path, home: Path) -> Iterator[Lab]:
    """JupyterLab serving ``root``, with its config, data and runtime dirs under ``home`` so that no user settings
    or workspaces leak in; the rest of the environment (HOME, the smallm cache) is the user's."""
    token = secrets.token_hex(16)
    port = free_port()
    dirs = {name: home / name for name in ("config", "data", "runtime", "ipython")}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    # Offline and quiet: no "get Jupyter news?" prompt.
    (dirs["config"] / "labconfig").mkdir(exist_ok=True)
    page_config = {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}
    (dirs["config"] / "labconfig" / "page_config.json").write_text(json.dumps(page_config), encoding="utf-8")
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(dirs["config"]),
        "JUPYTER_DATA_DIR": str(dirs["data"]),
        "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
        "IPYTHONDIR": str(dirs["ipython"]),
    }
    command = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.root_dir={root}",
        "--ServerApp.open_browser=False",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--ServerApp.allow_root=True")  # CI containers run as root
    lab = Lab(f"http://127.0.0.1:{port}", token, home / "jupyterlab.log")
    with lab.log.open("wb") as log:
        server = subprocess.Popen(
            command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited with {server.returncode} before answering:\n{lab.log_tail()}")
            try:
                get_json(lab.url("/api/status"))
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer within {SERVER_START_S} s:\n{lab.log_tail()}")
                time.sleep(0.5)
        yield lab
    finally:
        stop_process_group(server)


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """The server and its kernels: they share the server's process group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def headless_chromium(chromium: str, chromedriver: str) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(argument)
    # An explicit driver path: selenium-manager would otherwise try to download one.
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def kernel_state(lab: Lab, notebook: str) -> str | None:
    """The execution state of ``notebook``'s kernel from the sessions API; None while it has no session."""
    for session in get_json(lab.url("/api/sessions")):
        if session.get("path") == notebook and session.get("kernel"):
            return session["kernel"].get("execution_state")
    return None


def accept_kernel_dialog(driver: Any) -> None:
    """Accept the default kernel (Python 3) when JupyterLab asks which one to start."""
    from selenium.webdriver.common.by import By

    for dialog in driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog"):
        if "kernel" in dialog.text.lower():
            dialog.find_element(By.CSS_SELECTOR, ".jp-Dialog-button.jp-mod-accept").click()


def open_notebook(driver: Any, lab: Lab, notebook: str, timeout: float = 180) -> None:
    """Open ``notebook`` and wait until its cells are shown and its kernel is idle."""
    from selenium.webdriver.common.by import By

    driver.get(lab.url(f"/lab/tree/{notebook}"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        accept_kernel_dialog(driver)
        cells = driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Cell")
        indicator = driver.find_elements(By.CSS_SELECTOR, '.jp-Notebook-ExecutionIndicator[data-status="idle"]')
        if cells and indicator and kernel_state(lab, notebook) == "idle":
            return
        time.sleep(POLL_S)
    raise TimeoutError(f"{notebook} did not open with an idle kernel within {timeout:.0f} s")


def run_menu_command(driver: Any, menu: str, *commands: str) -> None:
    """Click ``menu`` in JupyterLab's menu bar, then its item for the first of ``commands`` (command ids: a menu
    item's id differs between JupyterLab versions) that it has."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 30)
    item = f'//li[contains(@class, "lm-MenuBar-item")][.//div[contains(@class, "lm-MenuBar-itemLabel")][.="{menu}"]]'
    wait.until(expected_conditions.element_to_be_clickable((By.XPATH, item))).click()
    entry = ", ".join(f'li.lm-Menu-item[data-command="{command}"]' for command in commands)
    wait.until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, entry))).click()


def cells_running(driver: Any) -> bool:
    return any("*" in prompt for prompt in driver.execute_script(PROMPTS_JS))


def watch_dashboard(driver: Any, deadline: float) -> DashboardWatch:
    """Poll the dashboard until its plot has been redrawn and its status line has moved often enough, the cells
    have stopped running, or ``deadline`` passes."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    watch = DashboardWatch()
    while time.monotonic() < deadline and not watch.enough():
        seen = driver.execute_script(DASHBOARD_JS)
        if seen is None:
            if not cells_running(driver):
                break  # the run ended (an error, or no dashboard) before the dashboard showed progress
            time.sleep(POLL_S)
            continue
        if seen["error"]:
            raise NotebookRunFailed(f"the dashboard shows an error: {seen['error']}")
        if seen["status"] and (not watch.statuses or seen["status"] != watch.statuses[-1]):
            watch.statuses.append(seen["status"])
        if seen["plot"] and (not watch.plots or seen["plot"] != watch.plots[-1][0]):
            # A new blob URL counts once the picture itself differs (the new image may still be decoding); an image
            # replaced while it is photographed is looked at again on the next round.
            with suppress(WebDriverException):
                plot = driver.find_element(By.CSS_SELECTOR, ".smallm-dashboard img.smallm-plot")
                digest = hashlib.sha256(plot.screenshot_as_png).hexdigest()
                if not watch.plots or digest != watch.plots[-1][1]:
                    watch.plots.append((seen["plot"], digest))
        if not cells_running(driver) and not watch.enough():
            break
        time.sleep(POLL_S)
    return watch


def save_dashboard_screenshot(driver: Any, path: Path) -> None:
    from selenium.webdriver.common.by import By

    root = driver.find_element(By.CSS_SELECTOR, ".smallm-dashboard")
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", root)
    driver.save_screenshot(str(path))
    if os.environ.get("SMALLM_SCREENSHOT"):
        shutil.copyfile(path, os.environ["SMALLM_SCREENSHOT"])


def wait_until_finished(driver: Any, lab: Lab, notebook: str, deadline: float) -> None:
    """Wait until no cell is queued or running and the kernel is idle (twice in a row: the kernel is idle for a
    moment between cells)."""
    settled = 0
    while settled < 2:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the notebook was still running after {NOTEBOOK_S} s")
        settled = settled + 1 if not cells_running(driver) and kernel_state(lab, notebook) == "idle" else 0
        time.sleep(1)


def save_notebook(driver: Any, timeout: float = 60) -> None:
    """Save through the File menu and wait until JupyterLab has written it (its tab is no longer marked dirty)."""
    from selenium.webdriver.common.by import By

    run_menu_command(driver, "File", "docmanager:save")
    deadline = time.monotonic() + timeout
    while driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-mod-dirty, .lm-TabBar-tab.jp-mod-dirty"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the notebook was not saved within {timeout:.0f} s")
        time.sleep(POLL_S)


def cell_errors(path: Path) -> list[str]:
    """Each code cell of the notebook file that did not run or whose output is an error, with the error."""
    import nbformat

    cells = [cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]
    problems = []
    for index, cell in enumerate(cells):
        errors = [output for output in cell.get("outputs", []) if output.get("output_type") == "error"]
        for error in errors:
            problems.append(f"code cell {index}: {error.get('ename')}: {error.get('evalue')}")
        if cell.execution_count is None and not errors:
            problems.append(f"code cell {index} did not run: {cell.source[:80]!r}")
    return problems


def run_notebook_in_lab(notebook: Path, tmp_path: Path, chromium: str, chromedriver: str) -> DashboardWatch:
    """Serve a copy of ``notebook`` from ``tmp_path``, run all its cells in the browser, watch its dashboard, save it
    and check the saved cells; fails with a screenshot in ``tmp_path`` and the server log's tail."""
    from selenium.common.exceptions import WebDriverException

    root = tmp_path / "notebooks"
    root.mkdir()
    shutil.copyfile(notebook, root / notebook.name)
    with jupyter_lab(root, tmp_path / "jupyter") as lab, headless_chromium(chromium, chromedriver) as driver:

        def fail(message: str) -> NoReturn:
            with suppress(WebDriverException):
                driver.save_screenshot(str(tmp_path / "failure.png"))
            pytest.fail(f"{message}\nscreenshot: {tmp_path / 'failure.png'}\nJupyterLab log:\n{lab.log_tail()}")

        try:
            open_notebook(driver, lab, notebook.name)
            started = time.monotonic()
            # Run All Cells: the menu's own command in JupyterLab 4.6 (runmenu:run-all), the notebook's in others.
            run_menu_command(driver, "Run", "notebook:run-all-cells", "runmenu:run-all")
            watch = watch_dashboard(driver, started + DASHBOARD_S)
            if watch.enough():
                save_dashboard_screenshot(driver, tmp_path / "dashboard.png")
            wait_until_finished(driver, lab, notebook.name, started + NOTEBOOK_S)
            save_notebook(driver)
            problems = cell_errors(root / notebook.name)
        except (TimeoutError, NotebookRunFailed, WebDriverException, OSError) as error:
            fail(f"{type(error).__name__}: {error}")
        if problems:
            fail("the saved notebook has cells that failed:\n" + "\n".join(problems))
        if not watch.enough():
            fail(
                f"the dashboard did not show training progress ({PLOT_CHANGES} plot redraws and {STATUS_CHANGES} "
                f"status changes) within {DASHBOARD_S} s: {watch.describe()}"
            )
        return watch


@pytest.mark.slow
def test_quickstart_dashboard_redraws_its_plot_while_training_in_jupyterlab(tmp_path: Path) -> None:
    pytest.importorskip("selenium", reason="the browser extra (selenium) is not installed")
    pytest.importorskip("jupyterlab", reason="the browser extra (jupyterlab) is not installed")
    pytest.importorskip("ipywidgets", reason="the notebook extra (ipywidgets) is not installed")
    pytest.importorskip("ipykernel", reason="the notebook extra (ipykernel) is not installed")
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip(
            "Debian's headless Chromium is not installed: apt-get install chromium chromium-driver "
            "(the test needs both chromium and chromedriver on PATH)"
        )
    assert NOTEBOOK.is_file(), f"the quickstart notebook is missing: {NOTEBOOK}"
    run_notebook_in_lab(NOTEBOOK, tmp_path, chromium, chromedriver)
