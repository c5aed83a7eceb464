"""JupyterLab in headless Chromium: start a throwaway lab, drive notebooks, take screenshots.

Everything runs offline on 127.0.0.1 with fresh Jupyter config/data/runtime dirs, so no
user configuration leaks in and nothing phones home (news and update checks are off).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nbformat
import psutil
from playwright.sync_api import (
    Browser,
    Dialog,
    Locator,
    Page,
    Playwright,
    Request,
    expect,
    sync_playwright,
)

from tests.support.swarm import Swarm

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
LAB_START_TIMEOUT_S = 90.0
KERNEL_OUTPUT_TIMEOUT_MS = 90_000


@dataclass(frozen=True)
class LabServer:
    """A running JupyterLab: where it listens and how to reach it."""

    url: str
    token: str
    root_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def notebook_url(self, name: str) -> str:
        return f"{self.url}/lab/tree/{name}?reset&token={self.token}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def write_lab_config(config_dir: Path) -> None:
    """Offline, quiet lab settings; the app object is exposed so tests can read its state."""
    server_config = {
        "ServerApp": {"open_browser": False},
        "LabApp": {
            "news_url": None,
            "check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
            "expose_app_in_browser": True,
            "extension_manager": "readonly",  # the default one queries PyPI
        },
        "LanguageServerManager": {"autodetect": False},
    }
    (config_dir / "jupyter_server_config.json").write_text(json.dumps(server_config))
    labconfig = config_dir / "labconfig"
    labconfig.mkdir(parents=True, exist_ok=True)
    page_config = {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}
    (labconfig / "page_config.json").write_text(json.dumps(page_config))


def lab_environment(home: Path) -> dict[str, str]:
    dirs = {
        "JUPYTER_CONFIG_DIR": home / "config",
        "JUPYTER_DATA_DIR": home / "data",
        "JUPYTER_RUNTIME_DIR": home / "runtime",
        "IPYTHONDIR": home / "ipython",
    }
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    write_lab_config(dirs["JUPYTER_CONFIG_DIR"])
    env = {key: value for key, value in os.environ.items() if not key.startswith("JUPYTER")}
    env.update({key: str(path) for key, path in dirs.items()})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_for_status(url: str, token: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Poll ``/api/status`` until the server answers, the process dies or time runs out."""
    deadline = time.monotonic() + LAB_START_TIMEOUT_S
    request = urllib.request.Request(
        f"{url}/api/status", headers={"Authorization": f"token {token}"}
    )
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)  # poll interval while the server boots, not a synchronisation
    raise TimeoutError(f"JupyterLab did not answer /api/status in {LAB_START_TIMEOUT_S} s")


def process_tree(process: subprocess.Popen[bytes]) -> list[psutil.Process]:
    try:
        root = psutil.Process(process.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_lab(lab: LabServer) -> list[str]:
    """Stop the lab and every process it started; returns the ones that survived (none)."""
    tree = process_tree(lab.process)
    if lab.process.poll() is None:
        os.killpg(lab.process.pid, signal.SIGTERM)
        try:
            lab.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(lab.process.pid, signal.SIGKILL)
            lab.process.wait(timeout=10)
    # Kernels run in their own sessions, so the process group does not cover them.
    _, alive = psutil.wait_procs(tree, timeout=10)
    for survivor in alive:
        survivor.kill()
    _, alive = psutil.wait_procs(alive, timeout=5)
    return [f"{p.pid} {p.name()}" for p in alive if p.is_running()]


@contextmanager
def running_lab(home: Path) -> Iterator[LabServer]:
    """Start JupyterLab on a free loopback port with a fresh config; stop it on exit."""
    root_dir = home / "root"
    root_dir.mkdir(parents=True, exist_ok=True)
    port, token = free_port(), secrets.token_hex(16)
    log_path = home / "lab.log"
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root_dir}",
    ]  # fmt: skip
    if os.geteuid() == 0:  # containers often run tests as root
        command.append("--allow-root")
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command,
            env=lab_environment(home),
            cwd=root_dir,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    lab = LabServer(f"http://127.0.0.1:{port}", token, root_dir, process, log_path)
    try:
        wait_for_status(lab.url, token, process, log_path)
        yield lab
    finally:
        survivors = stop_lab(lab)
        assert not survivors, f"processes left behind by JupyterLab: {survivors}"


JOIN_CELL = """
import os
import swarm_notebook

c = await swarm_notebook.join(
    os.environ["SWARM_NOTEBOOK_ROOM"],
    signaling=os.environ["SWARM_NOTEBOOK_SIGNALING"],
    secret=os.environ["SWARM_NOTEBOOK_SECRET"],
    profile=os.path.join(os.environ["SWARM_NOTEBOOK_PROFILE"], PROFILE_NAME),
)
await c.wait_for_peers(2, capability="python-execution", timeout=120)
c.dashboard()
"""


def join_cell(profile: str) -> str:
    """A cell that joins the lab's swarm as ``c`` (profile folder ``profile``), waits for
    two workers and shows the dashboard."""
    return f"PROFILE_NAME = {profile!r}\n{JOIN_CELL}"


@contextmanager
def python_workers(tmp: Path, room: str, secret: str, *names: str) -> Iterator[Swarm]:
    """A signaling server and a ``python-execution`` worker process per name (its card's
    name); every worker is stopped, and checked for problems, on exit."""
    running = Swarm(tmp, secret=secret, room=room)
    try:
        for name in names:
            running.start_worker(name, "python-execution")
        yield running
    finally:
        running.close()


@contextmanager
def lab_joining(home: Path, signaling: str, room: str, secret: str) -> Iterator[LabServer]:
    """A lab whose kernels find a swarm as `swarm-notebook up` gives them one: the
    ``SWARM_NOTEBOOK_*`` variables of its signaling server, room, secret and a profile
    folder, set for the lab (and restored here afterwards)."""
    session = {
        "SWARM_NOTEBOOK_SIGNALING": signaling,
        "SWARM_NOTEBOOK_ROOM": room,
        "SWARM_NOTEBOOK_SECRET": secret,
        "SWARM_NOTEBOOK_PROFILE": str(home / "profiles"),
        "SWARM_NOTEBOOK_ICE_HOSTS": "127.0.0.1",
    }
    saved = {key: os.environ.get(key) for key in session}
    os.environ.update(session)  # running_lab builds the lab's environment from ours
    try:
        with running_lab(home) as server:
            yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def chromium() -> Iterator[Browser]:
    """Headless system Chromium (never a downloaded one); checks it leaves no processes."""
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    with sync_playwright() as playwright:
        browser = launch(playwright)
        started = [
            child for child in psutil.Process().children(recursive=True) if child.pid not in before
        ]
        try:
            yield browser
        finally:
            browser.close()
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not alive, f"browser processes left behind: {[p.pid for p in alive]}"


def launch(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def write_notebook(directory: Path, name: str, cells: list[str]) -> Path:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    path = directory / name
    nbformat.write(notebook, path)
    return path


def open_notebook(page: Page, lab: LabServer, name: str) -> None:
    """Open a notebook and wait until its kernel is idle."""
    page.goto(lab.notebook_url(name))
    expect(page.locator(".jp-NotebookPanel .jp-Cell").first).to_be_visible(timeout=60_000)
    wait_kernel_idle(page)


def wait_kernel_idle(page: Page) -> None:
    page.wait_for_function(
        """() => {
            const app = window.jupyterapp;
            const panel = app && app.shell.currentWidget;
            const kernel = panel && panel.sessionContext && panel.sessionContext.session
                && panel.sessionContext.session.kernel;
            return kernel && kernel.status === "idle";
        }""",
        timeout=KERNEL_OUTPUT_TIMEOUT_MS,
    )


def menu(page: Page, *path: str) -> None:
    """Click through the main menu bar, e.g. ``menu(page, "Run", "Run All Cells")``."""
    page.locator("#jp-MainMenu").get_by_role("menuitem", name=path[0], exact=True).click()
    for item in path[1:]:
        # Submenu entries carry no menuitem role, so match the visible label instead.
        label = page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(item)}$"))
        page.locator(".lm-Menu .lm-Menu-item").filter(has=label).last.click()


def run_all_cells(page: Page) -> None:
    menu(page, "Run", "Run All Cells")


def run_cell_and_advance(page: Page) -> None:
    """Shift+Enter in command mode: run the selected cell and select the next one."""
    page.locator(".jp-NotebookPanel .jp-Notebook").press("Escape")
    page.keyboard.press("Shift+Enter")


def select_first_cell(page: Page) -> None:
    page.locator(".jp-NotebookPanel .jp-Cell").first.locator(".jp-InputPrompt").click()


def set_theme(page: Page, theme: str) -> None:
    menu(page, "Settings", "Theme", theme)
    light = "true" if "Light" in theme else "false"
    page.wait_for_function(
        f"() => document.body.dataset.jpThemeLight === '{light}'", timeout=30_000
    )


def screenshot(target: Page | Locator, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    target.screenshot(path=str(path))
    return path


def watch_page(page: Page, lab: LabServer) -> list[tuple[str, str]]:
    """Record what must not happen: page errors, dialogs (an ``alert`` means injected
    script ran) and requests leaving the lab's origin (the test runs offline)."""
    seen: list[tuple[str, str]] = []

    def on_dialog(dialog: Dialog) -> None:
        seen.append(("dialog", dialog.message))
        dialog.dismiss()

    def on_request(request: Request) -> None:
        if not request.url.startswith((lab.url, "data:", "blob:")):
            seen.append(("external-request", request.url))

    page.on("pageerror", lambda error: seen.append(("pageerror", str(error))))
    page.on("dialog", on_dialog)
    page.on("request", on_request)
    return seen
