"""ICE servers and policy: one schema for every entry point, checked at start.

The same list is accepted from ``join(ice_servers=...)``, the CLI (``--ice-server URL``,
``--ice-username``, ``--ice-credential``, ``--ice-policy``), ``%swarm join``, the
environment (``SWARM_NOTEBOOK_ICE_SERVERS`` as a JSON list, ``SWARM_NOTEBOOK_ICE_POLICY``)
and a profile file (``<profile>/ice.json``: ``{"ice_servers": [...], "ice_policy": "relay"}``)::

    [{"urls": "stun:stun.example.org:3478"},
     {"urls": ["turn:turn.example.org:3478", "turns:turn.example.org:443"],
      "username": "alice", "credential": "s3cret"}]

Precedence, per setting (servers and policy separately): an explicit argument, then the
environment, then the profile file, then what the signaling server issues at join. A
setting that cannot be used raises :class:`~swarm_notebook.errors.IceConfigError` at
start, instead of a swarm that silently never links.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import swarm_notebook.environment as environment
from swarm_notebook.errors import IceConfigError
from swarm_notebook.reasons import Reason

PROFILE_FILE = "ice.json"
POLICIES = ("all", "relay")

IcePolicy = Literal["all", "relay"]

# The URI forms aiortc accepts (RFC 7064 / 7065); anything else it would silently drop.
_URL = re.compile(
    r"(?P<scheme>stun|stuns|turn|turns):(?P<host>\[[0-9a-fA-F:.]+\]|[^?:\[\]/\s]+)"
    r"(?::(?P<port>[0-9]{1,5}))?(?:\?transport=(?P<transport>udp|tcp))?"
)
_MAX_SERVERS = 16
_MAX_FIELD = 512


@dataclass(frozen=True)
class IceServer:
    """One URL with its credentials (TURN needs both; STUN needs none)."""

    url: str
    username: str | None = None
    credential: str | None = None

    @property
    def scheme(self) -> str:
        return self.url.split(":", 1)[0]

    @property
    def is_turn(self) -> bool:
        return self.scheme in ("turn", "turns")

    @property
    def host(self) -> str:
        return _parse_url(self.url).group("host").strip("[]")

    @property
    def port(self) -> int:
        match = _parse_url(self.url)
        if match.group("port"):
            return int(match.group("port"))
        return 5349 if self.scheme in ("stuns", "turns") else 3478

    @property
    def transport(self) -> str:
        match = _parse_url(self.url)
        if match.group("transport"):
            return match.group("transport")
        return "tcp" if self.scheme == "turns" else "udp"

    def as_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"urls": self.url}
        if self.username is not None:
            entry["username"] = self.username
        if self.credential is not None:
            entry["credential"] = self.credential
        return entry

    def redacted(self) -> str:
        return f"{self.url} (user {self.username})" if self.username else self.url


@dataclass(frozen=True)
class IceSettings:
    """The chosen servers and policy, and where each came from (for doctor and errors)."""

    servers: tuple[IceServer, ...] = ()
    policy: IcePolicy = "all"
    servers_source: str = "none"
    policy_source: str = "default"

    @property
    def configured(self) -> bool:
        """True when the peer itself set servers (they then win over issued ones)."""
        return self.servers_source not in ("none", "signaling")

    def as_dicts(self) -> list[dict[str, Any]]:
        return [s.as_dict() for s in self.servers]


def _parse_url(url: str) -> re.Match[str]:
    match = _URL.fullmatch(url)
    if match is None:
        raise ValueError(url)
    return match


def _bad(source: str, message: str) -> IceConfigError:
    return IceConfigError(Reason.BAD_ICE_CONFIG, f"{source}: {message}")


def _text(value: Any, what: str, source: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > _MAX_FIELD:
        raise _bad(source, f"{what} must be a non-empty string of at most {_MAX_FIELD} chars")
    return value


def parse_servers(value: Any, source: str = "ice_servers") -> tuple[IceServer, ...]:
    """Validate a list of ``{"urls", "username", "credential"}`` dicts; one entry per URL."""
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise _bad(source, 'expected a list like [{"urls": "stun:host:3478"}]')
    if len(value) > _MAX_SERVERS:
        raise _bad(source, f"at most {_MAX_SERVERS} ICE servers, got {len(value)}")
    servers: list[IceServer] = []
    for index, entry in enumerate(value):
        where = f"{source}[{index}]"
        if not isinstance(entry, Mapping):
            raise _bad(where, f"expected an object with 'urls', got {type(entry).__name__}")
        unknown = set(entry) - {"urls", "username", "credential", "credentialType"}
        if unknown:
            raise _bad(where, f"unknown keys {sorted(unknown)}")
        if entry.get("credentialType", "password") != "password":
            raise _bad(where, "only credentialType 'password' is supported")
        urls = entry.get("urls")
        url_list = [urls] if isinstance(urls, str) else urls
        if not isinstance(url_list, list) or not url_list:
            raise _bad(where, "'urls' must be a URL or a non-empty list of URLs")
        username = _text(entry.get("username"), "username", where)
        credential = _text(entry.get("credential"), "credential", where)
        for url in url_list:
            servers.append(_server(url, username, credential, where))
    if len(servers) > _MAX_SERVERS:
        raise _bad(source, f"at most {_MAX_SERVERS} ICE URLs, got {len(servers)}")
    return tuple(servers)


def _server(url: Any, username: str | None, credential: str | None, where: str) -> IceServer:
    if not isinstance(url, str):
        raise _bad(where, f"a URL must be a string, got {type(url).__name__}")
    try:
        match = _parse_url(url)
    except ValueError:
        raise _bad(
            where,
            f"{url!r} is not an ICE URL (stun:HOST[:PORT], turn:HOST[:PORT][?transport=udp|tcp],"
            " turns:HOST[:PORT])",
        ) from None
    scheme = match.group("scheme")
    if scheme in ("stun", "stuns") and match.group("transport"):
        raise _bad(where, f"{url!r}: a STUN URL takes no ?transport")
    if scheme == "turns" and match.group("transport") == "udp":
        raise _bad(where, f"{url!r}: turns: runs over TCP only")
    if scheme == "stuns":
        raise _bad(where, f"{url!r}: stuns: is not supported by aiortc; use stun: or turns:")
    port = match.group("port")
    if port is not None and not 0 < int(port) < 65536:
        raise _bad(where, f"{url!r}: port out of range")
    if scheme in ("turn", "turns") and (username is None or credential is None):
        raise _bad(where, f"{url!r}: a TURN server needs 'username' and 'credential'")
    return IceServer(url=url, username=username, credential=credential)


def parse_policy(value: Any, source: str = "ice_policy") -> IcePolicy:
    if value == "all":
        return "all"
    if value == "relay":
        return "relay"
    raise _bad(source, f"ice policy must be one of {', '.join(POLICIES)}, got {value!r}")


def servers_from_urls(
    urls: Sequence[str], username: str | None = None, credential: str | None = None
) -> list[dict[str, Any]]:
    """The ``--ice-server URL`` flags as schema entries; credentials go to the TURN URLs."""
    entries: list[dict[str, Any]] = []
    for url in urls:
        entry: dict[str, Any] = {"urls": url}
        if url.startswith("turn") and username is not None:
            entry["username"] = username
        if url.startswith("turn") and credential is not None:
            entry["credential"] = credential
        entries.append(entry)
    return entries


def _env_servers(environ: Mapping[str, str]) -> tuple[IceServer, ...] | None:
    raw = environ.get(environment.ICE_SERVERS, "").strip()
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _bad(f"${environment.ICE_SERVERS}", f"not JSON: {exc}") from None
    return parse_servers(value, f"${environment.ICE_SERVERS}")


def _profile_settings(profile_dir: Path | None) -> tuple[Any, Any, str]:
    if profile_dir is None:
        return None, None, ""
    path = profile_dir / PROFILE_FILE
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None, str(path)
    except OSError as exc:
        raise _bad(str(path), f"cannot be read: {exc}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _bad(str(path), f"not JSON: {exc}") from None
    if not isinstance(data, dict) or set(data) - {"ice_servers", "ice_policy"}:
        raise _bad(str(path), 'expected {"ice_servers": [...], "ice_policy": "all"|"relay"}')
    return data.get("ice_servers"), data.get("ice_policy"), str(path)


def resolve(
    servers: Sequence[Mapping[str, Any]] | None = None,
    policy: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    profile_dir: Path | None = None,
) -> IceSettings:
    """Pick servers and policy by precedence: argument > environment > profile file.

    Raises ``IceConfigError`` for the first setting that cannot be used, naming its source.
    """
    env = os.environ if environ is None else environ
    file_servers, file_policy, file_source = _profile_settings(profile_dir)
    chosen_servers: tuple[IceServer, ...] = ()
    servers_source = "none"
    if servers is not None:
        chosen_servers, servers_source = parse_servers(list(servers), "ice_servers"), "argument"
    elif (from_env := _env_servers(env)) is not None:
        chosen_servers, servers_source = from_env, f"${environment.ICE_SERVERS}"
    elif file_servers is not None:
        chosen_servers = parse_servers(file_servers, f"{file_source}: ice_servers")
        servers_source = file_source
    chosen_policy: IcePolicy = "all"
    policy_source = "default"
    env_policy = env.get(environment.ICE_POLICY, "").strip()
    if policy is not None:
        chosen_policy, policy_source = parse_policy(policy, "ice_policy"), "argument"
    elif env_policy:
        chosen_policy = parse_policy(env_policy, f"${environment.ICE_POLICY}")
        policy_source = f"${environment.ICE_POLICY}"
    elif file_policy is not None:
        chosen_policy = parse_policy(file_policy, f"{file_source}: ice_policy")
        policy_source = file_source
    settings = IceSettings(chosen_servers, chosen_policy, servers_source, policy_source)
    check_usable(settings)
    return settings


def check_usable(settings: IceSettings) -> None:
    """A relay-only policy with servers set but no TURN among them can never link."""
    if (
        settings.policy == "relay"
        and settings.configured
        and not any(s.is_turn for s in settings.servers)
    ):
        raise _bad(
            settings.policy_source,
            f"ice policy 'relay' needs a TURN server, but {settings.servers_source} lists none",
        )
