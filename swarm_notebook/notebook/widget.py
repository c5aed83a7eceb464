"""The swarm dashboard: an anywidget panel that mirrors a coordinator's state.

The kernel pushes state when the source reports a change (no polling loop); bursts of
changes are coalesced so the front end gets at most one update per ``min_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import anywidget
import traitlets

from swarm_notebook.errors import SwarmError, UsageError
from swarm_notebook.membership.node import PeerState
from swarm_notebook.reasons import Reason
from swarm_notebook.views.status import dashboard_status
from swarm_notebook.workload.records import TaskState
from swarm_notebook.workload.refs import RefState

# Snapshot parts that change every second (the transfer rates): they travel in their own
# trait, so the rest is only sent, and redrawn, when it changed.
LIVE_KEYS = ("transfer_rate",)
PACKAGE_STATIC_DIR = Path(__file__).resolve().parent / "static"
REPO_JS_DIR = Path(__file__).resolve().parents[2] / "js"


def static_asset(
    name: str,
    *,
    search_dirs: tuple[Path, ...] = (PACKAGE_STATIC_DIR, REPO_JS_DIR),
) -> Path:
    """Path of a front-end file: ``static/`` in an installed wheel, ``js/`` in a checkout.

    >>> static_asset("widget.js").name
    'widget.js'
    """
    for directory in search_dirs:
        candidate = directory / name
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(directory / name) for directory in search_dirs)
    raise SwarmError(
        Reason.MISSING_ASSET,
        f"the dashboard front end {name!r} was not found (looked in {looked}); "
        "reinstall swarm_notebook or restore js/ in the source checkout",
    )


@runtime_checkable
class DashboardSource(Protocol):
    """What the dashboard needs from a coordinator (or anything shaped like one)."""

    def dashboard_snapshot(self) -> Mapping[str, Any]:
        """Current state as plain data (see the coordinator's snapshot shape)."""
        ...

    def on_change(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from any thread) after state changed; returns an unsubscribe."""
        ...

    async def reinitialize(self) -> None:
        """(Re)start the swarm connection; raises if that failed."""
        ...


@dataclass(frozen=True)
class DisplayLimits:
    """How much of a snapshot the panel receives; frames give the full data."""

    list_items: Mapping[str, int] = field(
        default_factory=lambda: {
            "peers": 200,
            "tasks_in_flight": 50,
            "latest_reflections": 20,
            "capabilities": 50,
            "recent_tasks": 20,
        }
    )
    default_list_items: int = 100
    text_chars: int = 2000
    depth: int = 8


def _display_copy(value: Any, limits: DisplayLimits, depth: int = 0) -> Any:
    """JSON-safe, size-bounded copy of ``value`` for the front end."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        if len(value) > limits.text_chars:
            return value[: limits.text_chars] + "…"
        return value
    if depth >= limits.depth:
        return _display_copy(repr(value), limits, depth)
    if isinstance(value, Mapping):
        return {str(k): _display_copy(v, limits, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_display_copy(item, limits, depth + 1) for item in value]
    return _display_copy(str(value), limits, depth)


def _split_live(shown: dict[str, Any]) -> dict[str, Any]:
    """Take LIVE_KEYS out of ``shown`` (in place) and return them."""
    return {key: shown.pop(key) for key in LIVE_KEYS if key in shown}


def display_snapshot(snapshot: Mapping[str, Any], limits: DisplayLimits) -> dict[str, Any]:
    """Bounded copy of a snapshot; long lists are cut and the cut counted in ``omitted``."""
    shown: dict[str, Any] = {}
    omitted: dict[str, int] = {}
    for key, value in snapshot.items():
        if isinstance(value, list | tuple):
            keep = limits.list_items.get(key, limits.default_list_items)
            if len(value) > keep:
                omitted[key] = len(value) - keep
                value = list(value)[:keep]
        shown[str(key)] = _display_copy(value, limits, 1)
    if omitted:
        shown["omitted"] = omitted
    return shown


class SwarmDashboard(anywidget.AnyWidget):
    """Live panel of a swarm: stats, peers, the task stream (a lane per peer, a bar per
    task coloured by state), the transfer-rate sparkline, tasks in flight and recently
    finished, resident data (refs and this peer's store), consensus and reflections. After
    a kernel restart or shutdown the view says it is disconnected and how to get a live
    panel again.

    >>> dashboard = SwarmDashboard(coordinator)  # doctest: +SKIP
    >>> dashboard  # doctest: +SKIP
    """

    _esm = static_asset("widget.js")
    _css = static_asset("widget.css")

    snapshot = traitlets.Dict().tag(sync=True)
    status = traitlets.Dict().tag(sync=True)
    busy = traitlets.Bool(False).tag(sync=True)
    # LIVE_KEYS of the snapshot, plus "now": the kernel's clock, to which the page aligns its own.
    live = traitlets.Dict().tag(sync=True)
    # The state names the front end styles, sent once so the JS keeps no copy of them.
    states = traitlets.Dict().tag(sync=True)

    def __init__(
        self,
        source: DashboardSource,
        *,
        min_interval: float = 0.25,
        initialize_timeout: float = 60.0,
        limits: DisplayLimits | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(source, DashboardSource):
            raise UsageError(
                Reason.BAD_SOURCE,
                "SwarmDashboard needs dashboard_snapshot(), on_change() and "
                f"async reinitialize(); got {type(source).__name__}",
            )
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise UsageError(
                    Reason.NO_EVENT_LOOP,
                    "create SwarmDashboard in a notebook cell or a coroutine, or pass loop=",
                ) from None
        self._source = source
        self._loop = loop
        self._min_interval = min_interval
        self._initialize_timeout = initialize_timeout
        self._limits = limits or DisplayLimits()
        self._closed = False
        self._unsubscribe: Callable[[], None] | None = None
        self._push_handle: asyncio.TimerHandle | None = None
        self._reinitialize_task: asyncio.Task[None] | None = None
        self._error: dict[str, str] | None = None
        self._counters = {"pushes": 0, "unchanged": 0, "errors": 0, "rejected_messages": 0}
        self._clock = clock
        shown = self._read_source() or {}
        self._live_data = _split_live(shown)
        super().__init__(
            snapshot=shown,
            status=self._status_for(shown),
            live=self._stamped(self._live_data),
            states={
                "peer": [str(s) for s in PeerState],
                "task": [str(s) for s in TaskState],
                "ref": [str(s) for s in RefState],
            },
        )
        self._last_push = loop.time()
        self.on_msg(self._handle_message)
        self._unsubscribe = source.on_change(self._source_changed)

    @property
    def counters(self) -> dict[str, int]:
        """Updates sent, refreshes skipped as unchanged, errors, rejected front-end messages."""
        return dict(self._counters)

    def refresh(self) -> bool:
        """Read the source now and send its state if it changed; True when something was sent."""
        shown = self._read_source()
        if shown is None:
            shown, live = dict(self.snapshot), self._live_data
        else:
            live = _split_live(shown)
        status = self._status_for(shown)
        state_changed = shown != self.snapshot or status != self.status
        live_changed = live != self._live_data
        if not (state_changed or live_changed):
            self._counters["unchanged"] += 1
            return False
        with self.hold_sync():
            if state_changed:
                self.snapshot = shown
                self.status = status
            if live_changed:
                self._live_data = live
                self.live = self._stamped(live)
        self._counters["pushes"] += 1
        return True

    def _stamped(self, live: dict[str, Any]) -> dict[str, Any]:
        return {**live, "now": round(self._clock(), 3)}

    def close(self) -> None:
        """Stop listening to the source and close the front-end view."""
        # ipywidgets also calls close() from __del__, possibly after a failed __init__.
        if not getattr(self, "_closed", True):
            self._closed = True
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None
            if self._push_handle is not None:
                self._push_handle.cancel()
                self._push_handle = None
            if self._reinitialize_task is not None:
                self._reinitialize_task.cancel()
        super().close()

    async def aclose(self) -> None:
        """Close and wait until a running reinitialize has finished cancelling."""
        self.close()
        if self._reinitialize_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reinitialize_task

    def _read_source(self) -> dict[str, Any] | None:
        try:
            raw = self._source.dashboard_snapshot()
        except Exception as exc:
            self._record_error(Reason.SNAPSHOT_FAILED, f"{type(exc).__name__}: {exc}")
            return None
        if not isinstance(raw, Mapping):
            self._record_error(
                Reason.BAD_SNAPSHOT,
                f"dashboard_snapshot() returned {type(raw).__name__}, not a dict",
            )
            return None
        return display_snapshot(raw, self._limits)

    def _status_for(self, shown: Mapping[str, Any]) -> dict[str, Any]:
        status: dict[str, Any] = dict(dashboard_status(shown))
        summary = shown.get("task_summary")
        if "tasks_not_sent" not in shown and isinstance(summary, Mapping):
            # Counters that cannot tell local refusals from the swarm's failures: count
            # the recent records instead (None, shown "-", until a task reached a peer).
            status["success_rate"] = summary.get("success_rate")
        status["error"] = self._error
        if self._error is not None:
            status["message"] = self._error["message"]
        return status

    def _record_error(self, code: Reason, message: str) -> None:
        self._error = {"code": code, "message": message}
        self._counters["errors"] += 1

    def _source_changed(self) -> None:
        # May run on any thread: only hand over to the widget's loop here.
        if self._closed:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed: nobody is watching
            self._loop.call_soon_threadsafe(self._schedule_push)

    def _schedule_push(self) -> None:
        if self._closed or self._push_handle is not None:
            return
        delay = max(0.0, self._last_push + self._min_interval - self._loop.time())
        self._push_handle = self._loop.call_later(delay, self._push)

    def _push(self) -> None:
        self._push_handle = None
        self._last_push = self._loop.time()
        if not self._closed:
            self.refresh()

    def _handle_message(self, _widget: object, content: object, _buffers: object) -> None:
        action = content.get("action") if isinstance(content, Mapping) else None
        if action == "initialize":
            self._loop.call_soon_threadsafe(self._start_reinitialize)
            return
        self._counters["rejected_messages"] += 1
        self._loop.call_soon_threadsafe(
            self._report_error,
            Reason.UNKNOWN_ACTION,
            f"the panel sent an unknown message: {content!r}",
        )

    def _report_error(self, code: Reason, message: str) -> None:
        self._record_error(code, message[: self._limits.text_chars])
        if not self._closed:
            self.refresh()

    def _start_reinitialize(self) -> None:
        if self._closed:
            return
        if self._reinitialize_task is not None and not self._reinitialize_task.done():
            self._counters["rejected_messages"] += 1
            return
        self.busy = True
        self._reinitialize_task = self._loop.create_task(self._reinitialize())

    async def _reinitialize(self) -> None:
        try:
            async with asyncio.timeout(self._initialize_timeout):
                await self._source.reinitialize()
        except TimeoutError:
            limit = self._initialize_timeout
            self._record_error(
                Reason.INITIALIZE_TIMEOUT, f"reinitialize() took longer than {limit} s"
            )
        except Exception as exc:
            self._record_error(Reason.INITIALIZE_FAILED, f"{type(exc).__name__}: {exc}")
        else:
            self._error = None
        finally:
            self.busy = False
            if not self._closed:
                self.refresh()
