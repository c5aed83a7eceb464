"""A live progress line for a delegated task: which peer, which state, how long.

In a Jupyter kernel the line is a display updated in place (``display_id``); in a
terminal it is one line rewritten with ``\\r`` (or, when output is not a terminal, just
the final summary). The cell waits on the task's future with a short timeout, so the
line moves while the network thread does the work.
"""

from __future__ import annotations

import concurrent.futures
import html
import sys
from typing import Any, Protocol, TextIO

from swarm_notebook.notebook.handle import RemoteRun, TaskProgress
from swarm_notebook.workload.records import TaskState

TICK_S = 0.25
OUTPUT_TICK_S = 0.1  # remote output reaches the cell this often while the task runs
COLOURS = {"running": "#0891b2", "ok": "#16a34a", "failed": "#dc2626"}


class ProgressLine:
    """One line of text with an HTML face (coloured by outcome)."""

    def __init__(self, text: str, tone: str = "running") -> None:
        self.text = text
        self.tone = tone

    def __repr__(self) -> str:
        return self.text

    def _repr_html_(self) -> str:
        colour = COLOURS.get(self.tone, COLOURS["running"])
        return (
            f'<div class="swarm-nb-progress" data-tone="{self.tone}" '
            f'style="font-family: var(--jp-code-font-family, monospace); '
            f'color: {colour};">{html.escape(self.text)}</div>'
        )


class ProgressView(Protocol):
    def update(self, progress: TaskProgress) -> None: ...

    def finish(self, line: ProgressLine) -> None: ...

    def interject(self) -> None:
        """Remote output is about to be printed below (or over) the line."""
        ...


def collapse_carriage_returns(text: str) -> str:
    r"""The same text for a terminal or a notebook, with overwritten ``\r`` updates dropped.

    A remote tqdm writes a whole bar per update; of a batch of them only the last can be
    seen. Each overwrite is applied as a terminal would (a shorter update keeps the tail
    of a longer one), so the result draws the same line.

    >>> collapse_carriage_returns("epoch\r 10%\r 50%\r100%\ndone\n")
    'epoch\r100%\ndone\n'
    >>> collapse_carriage_returns("\rabcdef\rxy")
    '\rxycdef'
    >>> collapse_carriage_returns("a\r\nb")
    'a\nb'
    """
    lines = text.replace("\r\n", "\n").split("\n")
    out = []
    for line in lines:
        if "\r" not in line:
            out.append(line)
            continue
        head, *updates = line.split("\r")
        shown = ""
        for update in updates:
            shown = update + shown[len(update) :]
        out.append(f"{head}\r{shown}")
    return "\n".join(out)


def show_output(chunks: list[tuple[str, str]], view: ProgressView | None = None) -> None:
    """Print remote output in the cell, each piece on its own stream, as it arrives."""
    if chunks and view is not None:
        view.interject()
    for stream, text in chunks:
        target = sys.stderr if stream == "stderr" else sys.stdout
        target.write(collapse_carriage_returns(text))
        target.flush()


def describe(progress: TaskProgress, label: str) -> str:
    """The running line.

    >>> describe(TaskProgress("t1", "P" * 52, "working", 1, 2.04), "python-computation")
    '⏳ python-computation on PPPPPPPPPPPPPPPP… · working · 2.0 s'
    >>> describe(TaskProgress("t1", None, "submitted", 0, 0.3, None, "a card"), "run")
    '⏳ run · waiting for a card · 0.3 s'
    """
    where = f" on {progress.where}" if progress.peer else ""
    retry = f" · attempt {progress.attempts}" if progress.attempts > 1 else ""
    state = f"waiting for {progress.waiting}" if progress.waiting else progress.state
    return f"⏳ {label}{where} · {state}{retry} · {progress.elapsed_s:.1f} s"


def summary(progress: TaskProgress, state: str, label: str) -> ProgressLine:
    """The final line: peer, duration and attempts.

    >>> summary(TaskProgress("t1", "P" * 52, "completed", 1, 0.5), "completed", "run").text
    '✔ run completed on PPPPPPPPPPPPPPPP… in 0.50 s (1 attempt)'
    >>> summary(TaskProgress("t1", "P" * 52, "completed", 2, 0.5, "w1"), "completed", "run").text
    '✔ run completed on w1 (PPPPPPPPPPPPPPPP…) in 0.50 s (2 attempts)'
    """
    attempts = f"{progress.attempts} attempt{'s' if progress.attempts != 1 else ''}"
    where = f" on {progress.where}" if progress.peer else ""
    mark, tone = ("✔", "ok") if state == TaskState.COMPLETED else ("✖", "failed")
    return ProgressLine(
        f"{mark} {label} {state}{where} in {progress.elapsed_s:.2f} s ({attempts})", tone
    )


class DisplayProgress:
    """Jupyter: a display output updated in place, so the cell shows one live line."""

    def __init__(self, label: str) -> None:
        from IPython.display import display

        self._label = label
        self._handle: Any = display(ProgressLine(f"⏳ {label} · starting"), display_id=True)
        self._last = ""

    def update(self, progress: TaskProgress) -> None:
        text = describe(progress, self._label)
        if text != self._last and self._handle is not None:
            self._last = text
            self._handle.update(ProgressLine(text))

    def finish(self, line: ProgressLine) -> None:
        if self._handle is not None:
            self._handle.update(line)

    def interject(self) -> None:
        """Output goes below the display, which stays where it is."""


class HandleDisplay:
    """``--no-wait`` in Jupyter: the handle shows as one line, rewritten when the task ends.

    Nothing is shown until the handle is displayed (the cell's value); then the line says
    where the task is, and ``finish`` replaces it with the summary in place.
    """

    def __init__(self, label: str) -> None:
        self._label = label
        self._handle: Any = None
        self.final: ProgressLine | None = None

    def show(self, progress: TaskProgress) -> None:
        from IPython.display import display

        line = self.final or ProgressLine(describe(progress, self._label))
        if self._handle is None:
            self._handle = display(line, display_id=True)
        else:
            # Shown again (``h`` in a later cell): same display id, so finish() updates both.
            self._handle.display(line)

    def update(self, progress: TaskProgress) -> None:
        if self._handle is not None and self.final is None:
            self._handle.update(ProgressLine(describe(progress, self._label)))

    def finish(self, line: ProgressLine) -> None:
        self.final = line
        if self._handle is not None:
            self._handle.update(line)

    def interject(self) -> None:
        """--no-wait prints no live output; the line stays where the handle is shown."""


class StreamProgress:
    """Terminal IPython: rewrite one line while waiting (tty only), then print the summary."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self._label = label
        self._stream = stream or sys.stderr
        self._live = bool(getattr(self._stream, "isatty", lambda: False)())
        self._width = 0

    def update(self, progress: TaskProgress) -> None:
        if self._live:
            text = describe(progress, self._label)
            self._stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
            self._stream.flush()

    def finish(self, line: ProgressLine) -> None:
        prefix = "\r" if self._live and self._width else ""
        self._stream.write(prefix + line.text.ljust(self._width) + "\n")
        self._stream.flush()

    def interject(self) -> None:
        """A terminal has one line to rewrite: leave it to the remote output (a remote
        tqdm rewrites its own) and print only the summary at the end."""
        if self._live and self._width:
            self._stream.write("\n")
            self._stream.flush()
        self._live = False
        self._width = 0


def wait_with_progress(
    run: RemoteRun,
    view: ProgressView,
    tick: float = TICK_S,
    output_tick: float = OUTPUT_TICK_S,
    live_output: bool = True,
) -> None:
    """Block until ``run`` finishes, updating ``view`` and printing the task's output as it
    arrives; Ctrl-C / interrupt cancels the task."""
    last_update = 0.0
    try:
        while True:
            done, _ = concurrent.futures.wait([run.future], timeout=min(tick, output_tick))
            if done:
                return
            if live_output:
                show_output(run.new_output(), view)
            if run.elapsed() - last_update >= tick:
                last_update = run.elapsed()
                view.update(run.progress())
    except KeyboardInterrupt:
        run.cancel()
        view.finish(ProgressLine(f"✖ canceled after {run.elapsed():.1f} s", "failed"))
        raise
