"""Environment preflight (issue #13 item 6): cards carry versions, ``requires`` filters peers,
and a numpy / pandas major.minor difference is one warning per peer, with its name."""

from __future__ import annotations

import asyncio
import importlib.metadata
import platform
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from swarm_notebook.client import join
from swarm_notebook.coordinator.config import CoordinatorConfig
from swarm_notebook.coordinator.coordinator import SwarmCoordinator
from swarm_notebook.coordinator.events import EventBus
from swarm_notebook.errors import (
    CardError,
    EnvironmentMismatchWarning,
    NoCapablePeerError,
    TaskInputError,
)
from swarm_notebook.identity import Identity
from swarm_notebook.membership.agent_card import AgentCard, make_card, verify_card
from swarm_notebook.membership.versions import (
    MAX_REPORTED,
    environment_report,
    parse_requires,
    unmet,
)
from swarm_notebook.signaling import SignalingServer
from swarm_notebook.transport.memory import MemoryNetwork, MemoryTransport
from swarm_notebook.workload.executors.capabilities import ExecutorConfig
from tests.support.procs import WorkerProcess

pytestmark = pytest.mark.timeout(180)


def larger(a: int, b: int) -> int:
    return max(a, b)


def card(identity: Identity, environment: dict[str, str]) -> bytes:
    made = make_card(
        identity,
        name="w",
        version="1",
        capabilities=["python-execution"],
        concurrency=1,
        limits={},
        seq=1,
        environment=environment,
    )
    return msgspec.msgpack.encode(made)


def test_report_has_python_and_the_key_packages_installed_here() -> None:
    report = environment_report(["msgspec", "not-a-package-anyone-installed"])
    assert report["python"] == platform.python_version()
    for name in ("numpy", "pandas", "pyarrow", "msgspec"):
        assert report[name] == importlib.metadata.version(name), name
    assert "not-a-package-anyone-installed" not in report


def test_cards_sign_their_environment_and_stay_bounded() -> None:
    me = Identity.generate()
    good = msgspec.msgpack.decode(card(me, {"python": "3.11.9", "pandas": "2.2.3"}))
    verified = verify_card(msgspec.convert(good, AgentCard), me.peer_id)
    assert verified.environment == {"python": "3.11.9", "pandas": "2.2.3"}
    # A relay that rewrites a version breaks the signature.
    forged = msgspec.structs.replace(verified, environment={"pandas": "9.9"})
    with pytest.raises(CardError) as err:
        verify_card(forged, me.peer_id)
    assert err.value.reason == "bad-signature"
    too_many = {f"pkg{i}": "1.0" for i in range(MAX_REPORTED + 1)}
    for environment in (too_many, {"pandas": "1" * 65}, {"": "1.0"}):
        bloated = msgspec.convert(msgspec.msgpack.decode(card(me, environment)), AgentCard)
        with pytest.raises(CardError) as err:
            verify_card(bloated, me.peer_id)
        assert err.value.reason == "bad-card"


def test_requires_compare_with_specifiers_and_bad_ones_are_refused() -> None:
    specs = parse_requires({"pandas": ">=2.2", "sklearn": "~=1.4"})
    report = {"pandas": "2.2.3", "scikit-learn": "1.5.0"}
    assert unmet(report, specs) == []
    assert unmet({"pandas": "2.1.4"}, specs) == ["pandas 2.1.4 (needs >=2.2)", "no scikit-learn"]
    assert unmet({"pandas": "2.3.0rc1", "scikit-learn": "1.4.2"}, specs) == []
    with pytest.raises(TaskInputError) as err:
        parse_requires({"pandas": "2.2"})
    assert err.value.reason == "bad-arguments" and ">=2.2" in err.value.message


async def test_requires_picks_peers_by_the_versions_on_their_cards(
    server: SignalingServer, tmp_path: Path
) -> None:
    worker = await WorkerProcess.start(
        server.url,
        "versions",
        str(tmp_path / "w"),
        "--caps",
        "python-execution",
        "--report-package",
        "msgspec",
        name="versioned-worker",
    )
    try:
        c = await join("versions", signaling=server.url, profile=tmp_path / "nb")
        try:
            await c.wait_for_peers(1, capability="python-execution")
            row = c.peers_frame().iloc[0]
            msgspec_version = importlib.metadata.version("msgspec")
            assert f"msgspec {msgspec_version}" in row["versions"]
            assert f"python {platform.python_version()}" in row["versions"]
            ok = await c.delegate_task(
                "python-computation", {"code": "1 + 1"}, requires={"msgspec": ">=0.1"}
            )
            assert ok["success"] and ok["peer"] == worker.peer_id
            with pytest.raises(NoCapablePeerError) as err:
                await c.delegate_task(
                    "python-computation", {"code": "1"}, requires={"pandas": ">=99"}
                )
            assert err.value.reason == "unmet-requirement"
            pandas_version = importlib.metadata.version("pandas")
            assert "versioned-worker" in err.value.message
            assert f"pandas {pandas_version} (needs >=99)" in err.value.message
            # The futures API takes the same requirement.
            fut = c.submit(larger, 3, 4, requires={"numpy": ">=1"})
            assert fut.result(60) == 4
            with pytest.raises(NoCapablePeerError):
                c.submit(larger, 3, 4, requires={"numpy": "<1"}).result(60)
        finally:
            await c.leave()
    finally:
        assert await worker.stop() == 0


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[SwarmCoordinator, SwarmCoordinator]]:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "a.txt").write_text("x\n")
    net = MemoryNetwork()
    files = ExecutorConfig(workspace=workspace)
    peers = []
    for name, cfg in (
        ("asker", CoordinatorConfig(name="asker")),
        ("old-numpy", CoordinatorConfig(name="old-numpy", executors=files)),
    ):
        identity = Identity.generate()
        transport = MemoryTransport(identity, net, "room")
        peers.append(SwarmCoordinator(identity, transport, cfg, tmp_path / name, EventBus()))
    for p in peers:
        await p.start()
    yield peers[0], peers[1]
    for p in peers:
        await p.leave()


async def test_a_major_minor_difference_warns_once_per_peer_with_its_name(
    pair: tuple[SwarmCoordinator, SwarmCoordinator],
) -> None:
    asker, other = pair
    assert "numpy" in asker.environment
    # The other peer's signed card says it runs numpy 1.0 (as one with an old numpy would).
    claimed = {**other.environment, "numpy": "1.0.0"}
    changed = asyncio.Event()
    asker.node.add_listener(lambda _peer, what: changed.set() if what == "card" else None)
    other.node.advertise(other.node.capabilities, 1, {}, other.isolation or "", environment=claimed)

    def arrived() -> bool:
        view = asker.node.peer(other.local_id)
        return view is not None and view.card is not None and view.card.environment == claimed

    async with asyncio.timeout(10):
        while not arrived():
            changed.clear()
            await changed.wait()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = await asker.delegate_task("file-analysis", {"path": "a.txt"})
        second = await asker.delegate_task("file-analysis", {"path": "a.txt"})
    mismatch = [w for w in caught if issubclass(w.category, EnvironmentMismatchWarning)]
    assert len(mismatch) == 1
    text = str(mismatch[0].message)
    assert "old-numpy" in text and "numpy" in text and "1.0 there" in text
    assert first["environment_warning"] and "environment_warning" not in second
