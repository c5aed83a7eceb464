"""The example notebooks, executed top to bottom by nbclient against real peers.

Each notebook runs in a real ipykernel whose environment carries only what
``swarm-notebook up`` would give it (signaling URL, room, room secret, profile folder).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import psutil
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionComplete
from nbclient.util import ensure_async

from tests.support.procs import child_processes
from tests.support.swarm import Swarm

pytestmark = pytest.mark.timeout(300)

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ROOM = "notebooks"
SECRET = "notebook-test-secret"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    running = Swarm(tmp_path_factory.mktemp("swarm"), secret=SECRET, room=ROOM)
    # As under `swarm-notebook up`: the workers are a roster the kernels trust, so the
    # governance notebook's high-risk proposals are put to a vote (an open room refuses).
    running.put_on_roster("w0", "w1")
    try:
        running.start_worker("w0", "python-execution")
        running.start_worker("w1", "python-execution")
        yield running
    finally:
        running.close()
    assert child_processes() == []


def execute(name: str, swarm: Swarm, workdir: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert not any(cell.get("outputs") for cell in code_cells), f"clear {name}'s outputs"
    env = {
        **os.environ,
        "SWARM_NOTEBOOK_SIGNALING": swarm.url,
        "SWARM_NOTEBOOK_ROOM": ROOM,
        "SWARM_NOTEBOOK_SECRET": SECRET,
        "SWARM_NOTEBOOK_PROFILE": str(workdir / "profiles"),
        "SWARM_NOTEBOOK_ICE_HOSTS": "127.0.0.1",
        "SWARM_NOTEBOOK_ROSTER_OWNER": swarm.roster_owner,
    }
    client = RecordingClient(
        notebook,
        timeout=120,
        # nbclient waits iopub_timeout (4 s by default) after a cell's reply for the rest
        # of its output, then moves on silently: wait longer, and fail loudly instead.
        iopub_timeout=60,
        raise_on_iopub_timeout=True,
        kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute(env=env)
    assert live_children(swarm) == [], "the kernel left processes behind"
    notebook.metadata["iopub_log"] = client.iopub_log
    return notebook


class RecordingClient(NotebookClient):
    """nbclient, noting every IOPub message it reads, also those it drops as another
    cell's: a notebook whose cell lost its output shows what did arrive, and for whom."""

    iopub_log: list[str]

    async def _async_poll_output_msg(
        self, parent_msg_id: str, cell: nbformat.NotebookNode, cell_index: int
    ) -> None:
        # nbclient's loop (0.10/0.11), plus the note.
        self.iopub_log = getattr(self, "iopub_log", [])
        assert self.kc is not None
        while True:
            msg = await ensure_async(self.kc.iopub_channel.get_msg(timeout=None))
            parent = msg["parent_header"].get("msg_id", "")
            content = msg["content"]
            what = content.get("text") or content.get("execution_state") or ""
            self.iopub_log.append(
                f"cell {cell_index} ({parent_msg_id[-6:]}): {msg['msg_type']} for "
                f"{parent[-6:] or '-'} {str(what)[:60]!r}"
            )
            if parent == parent_msg_id:
                try:
                    self.process_message(msg, cell, cell_index)
                except CellExecutionComplete:
                    return


def outputs_text(notebook: nbformat.NotebookNode) -> list[str]:
    texts = []
    for cell in notebook.cells:
        parts: list[str] = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                parts.append(output["text"])
            data: dict[str, Any] = output.get("data", {})
            parts.append(str(data.get("text/plain", "")))
            parts.append(str(data.get("text/html", "")))
        texts.append("\n".join(parts))
    return texts


def report(notebook: nbformat.NotebookNode) -> str:
    """Every cell's output, numbered and cut short, and the IOPub messages that came:
    what a failed assertion shows."""
    texts = outputs_text(notebook)
    shown = [f"[{i}] {t[:300]!r}" for i, t in enumerate(texts) if t.strip()]
    return "\n".join([*shown, "IOPub:", *notebook.metadata.get("iopub_log", [])])


def live_children(swarm: Swarm) -> list[Any]:
    """Our processes other than the workers and their sandboxes (bwrap nests them deeper)."""
    theirs = set()
    for worker in swarm.workers:
        theirs.add(worker.proc.pid)
        try:
            theirs.update(p.pid for p in psutil.Process(worker.proc.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return [p for p in child_processes() if p.pid not in theirs]


def test_quickstart(swarm: Swarm, tmp_path: Path) -> None:
    notebook = execute("quickstart.ipynb", swarm, tmp_path)
    texts = outputs_text(notebook)
    everything = "\n".join(texts)
    assert "joined room 'notebooks'" in everything and "2 peer(s) connected" in everything
    run_output = next(t for t in texts if "computed in worker process" in t)
    assert "✔ python-computation completed on" in run_output
    assert "revenue" in run_output  # the by_region table came back and was displayed
    worker_pids = {str(w.proc.pid) for w in swarm.workers}
    # The code ran in a sandbox child of a worker, never in the kernel.
    assert not any(f"process {pid}\n" in run_output for pid in worker_pids)
    assert "completed" in next(t for t in texts if "duration" in t)  # tasks_frame
    assert "rows: 3" in everything  # the --no-wait handle was awaited
    # The --no-wait cell shows one progress line, not "completed" above a handle that still
    # read state=submitted. (Its update to the summary may come between cells, which nbclient
    # does not record; tests/browser/test_quickstart_browser.py sees it in JupyterLab.)
    no_wait = next(
        text
        for cell, text in zip(notebook.cells, texts, strict=True)
        if cell.cell_type == "code" and "--no-wait" in cell.source
    )
    assert "python-computation on" in no_wait and "state=" not in no_wait
    assert no_wait.count("python-computation on") == 2  # one line: its text and HTML faces
    assert "application/vnd.jupyter.widget-view+json" in str(notebook.cells)  # the dashboard


def test_knowledge(swarm: Swarm, tmp_path: Path) -> None:
    notebook = execute("knowledge.ipynb", swarm, tmp_path)
    everything = "\n".join(outputs_text(notebook))
    assert "shared with 3 peer(s)" in everything  # two workers and this notebook's peer
    assert "Vectorise groupby aggregations" in everything
    assert "answered" in everything
    assert "from_peer_name" in everything and "w0" in everything  # answers by card name


def test_governance(swarm: Swarm, tmp_path: Path) -> None:
    notebook = execute("governance.ipynb", swarm, tmp_path)
    texts = outputs_text(notebook)
    assert "'high'" in texts[5]
    assert "(True, 'approved')" in texts[6]
    assert "(True, False)" in "\n".join(texts)  # the real result verifies, the forged one not
    assert "refused: the code calls eval()/exec()" in "\n".join(texts)


def test_futures(swarm: Swarm, tmp_path: Path) -> None:
    notebook = execute("futures.ipynb", swarm, tmp_path)
    texts = outputs_text(notebook)
    everything = "\n".join(texts)
    expected = [
        "total units: 16.0 computed on w",
        "first squares: [0, 1, 4, 9, 16]",
        "map:",  # the one bar over the items
        "/200",
        # Which finishes first depends on the slots free at the time; that all three
        # arrive through as_completed does not.
        "in the order they finished: [",
        "all of them: [1, 4, 9]",
        "8 epochs; output arrived in",
        "epoch 7 done",
        "cancelled: True | state: canceled",
        "ZeroDivisionError",
        "items kept: 1",
        "[1, 2]",  # %%swarm run --session saw the session's list
        "demo        w",  # sessions_frame
        "open     3",
        "session demo is closed",
        "left room",
    ]
    missing = [text for text in expected if text not in everything]
    assert missing == [], f"{missing}\n{report(notebook)}"
    magic = next(t for t in texts if "step 4" in t)  # %%swarm run printed in its cell
    assert "5/5" in magic and "✔ python-computation completed" in magic, report(notebook)
    pieces = int(everything.split("output arrived in ", 1)[1].split()[0])
    assert pieces >= 3  # the output came while the task ran, not in one piece at the end
    failed = next((t for t in texts if "failed on" in t), "")
    assert "failed on w" in failed and "return scaled / b" in failed, report(notebook)
