"""A signaling server and real worker processes run from a background loop, for tests
whose own code is synchronous (IPython shells, nbclient, Playwright)."""

from __future__ import annotations

from pathlib import Path

from swarm_notebook._util.loop_thread import LoopThread
from swarm_notebook.identity import Identity
from swarm_notebook.membership.roster import make_roster, save_roster
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
        self.roster_owner = ""  # set by put_on_roster

    @property
    def url(self) -> str:
        return self.server.url

    def put_on_roster(self, *names: str) -> str:
        """Keys for workers ``names`` (started later) and a roster of them owned by a fresh
        owner key, saved in each worker's profile; returns the owner's id (give it to
        kernels as ``SWARM_NOTEBOOK_ROSTER_OWNER``, as ``swarm-notebook up`` does)."""
        owner = Identity.load_or_create(self.tmp / "roster-owner")
        members = {Identity.load_or_create(self.tmp / n).peer_id: n for n in names}
        roster = make_roster(owner, self.room, {owner.peer_id: "owner", **members})
        for name in names:
            save_roster(self.tmp / name, roster)
        self.roster_owner = owner.peer_id
        return owner.peer_id

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
