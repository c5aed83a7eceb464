"""ICE settings: one schema, precedence, clear errors at start, server choice per link."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
from aiortc import RTCIceTransportPolicy

import swarm_notebook
import swarm_notebook.environment as environment
from swarm_notebook.errors import IceConfigError, UsageError
from swarm_notebook.reasons import Reason
from swarm_notebook.transport.backends.aiortc_backend import rtc_configuration
from swarm_notebook.transport.ice_config import (
    IceServer,
    parse_servers,
    resolve,
    servers_from_urls,
)
from swarm_notebook.transport.ice_path import Route, ServerChoice
from swarm_notebook.transport.mesh import MeshConfig
from tests.support.procs import REPO

TURN = {"urls": "turn:198.51.100.7:3478", "username": "u", "credential": "c"}
STUN = {"urls": "stun:198.51.100.7:3478"}


def test_parse_accepts_the_forms_aiortc_understands() -> None:
    servers = parse_servers(
        [
            STUN,
            {
                "urls": ["turn:t.example:3478?transport=tcp", "turns:t.example:443"],
                "username": "u",
                "credential": "c",
            },
        ]
    )
    assert [s.url for s in servers] == [
        "stun:198.51.100.7:3478",
        "turn:t.example:3478?transport=tcp",
        "turns:t.example:443",
    ]
    assert [(s.host, s.port, s.transport) for s in servers[1:]] == [
        ("t.example", 3478, "tcp"),
        ("t.example", 443, "tcp"),
    ]
    assert servers[2].username == "u" and servers[2].is_turn


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ({"urls": "turn:t.example:3478"}, "needs 'username' and 'credential'"),
        ({"urls": "http://t.example"}, "is not an ICE URL"),
        ({"urls": "stun:t.example:3478?transport=tcp"}, "takes no ?transport"),
        ({"urls": "turns:t.example:443?transport=udp"}, "TCP only"),
        ({"urls": "stuns:t.example"}, "not supported"),
        ({"urls": "stun:t.example:99999"}, "port out of range"),
        ({"urls": []}, "non-empty list"),
        ({"url": "stun:t.example"}, "unknown keys"),
        ("stun:t.example", "expected an object"),
    ],
)
def test_unusable_entries_are_clear_errors(entry: object, words: str) -> None:
    with pytest.raises(IceConfigError) as err:
        parse_servers([entry], "ice_servers")
    assert err.value.reason is Reason.BAD_ICE_CONFIG
    assert words in err.value.message and "ice_servers[0]" in err.value.message
    assert isinstance(err.value, UsageError)


def test_precedence_argument_then_environment_then_profile_file(tmp_path: Path) -> None:
    (tmp_path / "ice.json").write_text(
        json.dumps({"ice_servers": [{"urls": "stun:file.example"}, TURN], "ice_policy": "relay"})
    )
    env = {environment.ICE_SERVERS: json.dumps([{"urls": "stun:env.example"}])}
    from_file = resolve(environ={}, profile_dir=tmp_path)
    assert [s.url for s in from_file.servers] == ["stun:file.example", TURN["urls"]]
    assert from_file.servers_source.endswith("ice.json") and from_file.policy == "relay"
    # relay from the file with only STUN would never link: that is refused up front.
    with pytest.raises(IceConfigError, match="needs a TURN server"):
        resolve(environ=env, profile_dir=tmp_path)
    env[environment.ICE_POLICY] = "all"
    from_env = resolve(environ=env, profile_dir=tmp_path)
    assert [s.url for s in from_env.servers] == ["stun:env.example"]
    assert (from_env.servers_source, from_env.policy) == (f"${environment.ICE_SERVERS}", "all")
    explicit = resolve([TURN], "relay", environ=env, profile_dir=tmp_path)
    assert [s.url for s in explicit.servers] == [TURN["urls"]]
    assert (explicit.servers_source, explicit.policy_source) == ("argument", "argument")
    nothing = resolve(environ={}, profile_dir=tmp_path / "none")
    assert nothing.servers == () and not nothing.configured


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({environment.ICE_SERVERS: "[{"}, "not JSON"),
        ({environment.ICE_SERVERS: json.dumps([{"urls": "turn:x"}])}, "needs 'username'"),
        ({environment.ICE_POLICY: "direct"}, "must be one of all, relay"),
    ],
)
def test_bad_environment_names_the_variable(env: dict[str, str], words: str) -> None:
    with pytest.raises(IceConfigError) as err:
        resolve(environ=env)
    assert words in err.value.message and "$SWARM_NOTEBOOK_ICE_" in err.value.message


def test_cli_flags_give_the_credentials_to_turn_urls_only() -> None:
    entries = servers_from_urls(["stun:s.example", "turn:t.example"], "u", "c")
    assert entries == [
        {"urls": "stun:s.example"},
        {"urls": "turn:t.example", "username": "u", "credential": "c"},
    ]


def test_rtc_configuration_is_explicit_and_carries_the_policy() -> None:
    empty = rtc_configuration(MeshConfig().backend_config())
    assert empty.iceServers == []  # never aiortc's default public STUN server
    relay = rtc_configuration(MeshConfig(ice_servers=[TURN], ice_policy="relay").backend_config())
    assert relay.iceTransportPolicy is RTCIceTransportPolicy.RELAY
    assert relay.iceServers is not None and relay.iceServers[0].username == "u"


async def test_join_with_a_bad_setting_fails_at_start_not_with_a_silent_no_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(environment.ICE_SERVERS, json.dumps([{"urls": "turn:t.example"}]))
    # Nothing listens on this port: reaching the network would be a SignalingTimeout.
    with pytest.raises(IceConfigError, match="needs 'username' and 'credential'"):
        await swarm_notebook.join("lab", signaling="ws://127.0.0.1:9/ws", profile=tmp_path)


async def test_cli_worker_rejects_a_bad_ice_server_with_a_message(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "swarm_notebook.cli.main", "worker",
        "--profile", str(tmp_path), "--ice-server", "turn:t.example:3478",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": REPO},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2, (out, err)
    assert b"--ice-server" in err and b"needs 'username' and 'credential'" in err
    assert b"Traceback" not in err


def test_server_choice_gives_one_of_each_and_rotates_past_a_dead_one() -> None:
    servers = parse_servers(
        [
            {"urls": ["stun:a.example", "stun:b.example"]},
            {"urls": ["turn:a.example", "turn:b.example"], "username": "u", "credential": "c"},
        ]
    )
    choice = ServerChoice(servers)
    first = choice.for_new_link()
    assert [s.url for s in first] == ["stun:a.example", "turn:a.example"]
    choice.failed(first, {"host", "relay"})  # STUN gave nothing, TURN worked
    assert [s.url for s in choice.for_new_link()] == ["stun:b.example", "turn:a.example"]
    choice.failed(first, {"host"})  # stale for the STUN already left; TURN now failed too
    assert [s.url for s in choice.for_new_link()] == ["stun:b.example", "turn:b.example"]
    # Renewed credentials keep the position by URL.
    choice.replace(
        parse_servers(
            [
                {"urls": ["stun:a.example", "stun:b.example"]},
                {"urls": ["turn:a.example", "turn:b.example"], "username": "v", "credential": "d"},
            ]
        )
    )
    chosen = choice.for_new_link()
    assert [s.url for s in chosen] == ["stun:b.example", "turn:b.example"]
    assert chosen[1].username == "v"


def test_a_single_server_is_never_rotated_away() -> None:
    only = (IceServer("stun:a.example"),)
    choice = ServerChoice(only)
    choice.failed(only, {"host"})
    assert choice.for_new_link() == list(only) and choice.rotations == 0


def test_route_kind_is_the_most_indirect_end() -> None:
    assert Route("host", "relay", "a", "b").kind == "relay"
    assert Route("host", "srflx", "a", "b").kind == "srflx"
    assert Route("prflx", "host", "a", "b").kind == "srflx"
    assert Route("host", "host", "a", "b").kind == "host"


def test_up_hands_its_ice_flags_to_every_started_peer_as_environment() -> None:
    import argparse

    from swarm_notebook.cli import up

    parser = argparse.ArgumentParser()
    up.add_arguments(parser)
    args = parser.parse_args(
        ["--ice-server", "turn:t.example:3478", "--ice-username", "u", "--ice-credential", "c",
         "--ice-policy", "relay"]
    )  # fmt: skip
    env = up.ice_environment(args)
    assert json.loads(env[environment.ICE_SERVERS]) == [
        {"urls": "turn:t.example:3478", "username": "u", "credential": "c"}
    ]
    assert env[environment.ICE_POLICY] == "relay"
    assert up.ice_environment(parser.parse_args([])) == {}
    with pytest.raises(IceConfigError):
        up.ice_environment(parser.parse_args(["--ice-server", "turn:t.example"]))
