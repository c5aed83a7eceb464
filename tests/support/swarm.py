"""A signaling server and real worker processes run from a background loop, for tests
whose own code is synchronous (IPython shells, nbclient, Playwright)."""

from __future__ import annotations

from pathlib import Path

from swarm_notebook._util.loop_thread import LoopThread
from swarm_notebook.signaling import SignalingConfig, SignalingServer
from tests.support.procs import WorkerProcess


class Swarm:
    """A signaling server and workers, run from a background loop of this process."""

    def __init__(self, tmp: Path, *, room: str, secret: str | None = None) -> None:
        self.tmp = tmp
        self.secret = secret
        self.room = room
        self.net = LoopThread(name="test-swarm")
        self.net.start()
        self.server = SignalingServer(SignalingConfig(port=0, secret=secret))
        self.net.run_sync(self.server.start(), timeout=30)
        self.workers: list[WorkerProcess] = []

    @property
    def url(self) -> str:
        return self.server.url

    def start_worker(self, name: str, *caps: str) -> WorkerProcess:
        args = ["--caps", ",".join(caps)]
        if self.secret:
            args += ["--secret", self.secret]
        if "file-management" in caps:
            (self.tmp / "ws").mkdir(exist_ok=True)
            args += ["--workspace", str(self.tmp / "ws")]
        worker = self.net.run_sync(
            WorkerProcess.start(self.url, self.room, str(self.tmp / name), *args, name=name),
            timeout=90,
        )
        self.workers.append(worker)
        return worker

    def stop_worker(self, worker: WorkerProcess) -> int:
        return self.net.run_sync(worker.stop(), timeout=60)

    def close(self) -> None:
        for worker in self.workers:
            code = self.stop_worker(worker)
            if code != -9:
                assert code == 0, "".join(worker.stderr_lines[-20:])
                assert worker.problems() == [], worker.problems()
        self.net.run_sync(self.server.close(), timeout=30)
        self.net.stop()
