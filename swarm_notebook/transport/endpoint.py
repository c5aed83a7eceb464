"""Request/response, one-way messages and broadcast over any ``Transport``.

A reply is matched by its correlation id *and* by the peer that was asked, so no other
peer can answer in its place. Handlers are registered per message type; registering a
type again replaces the handler (it never delivers twice).

When the transport reports that the peer refused a message we sent (``Refusal``: too
large, reassembly full, timed out half-way), a request waiting on it fails at once with
the peer's reason, and a refused *reply* is turned into an error reply, so the asker does
not wait out its timeout either. Counters are keyed only by message types this endpoint
knows; everything else is counted under ``OTHER``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import logging
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from swarm_notebook._util.tasks import OwnedTasks
from swarm_notebook.errors import (
    HandlerRefusal,
    PeerUnavailable,
    ProtocolError,
    RemoteError,
    RequestTimeout,
)
from swarm_notebook.protocol.envelope import PROTOCOL_VERSION, Envelope, convert_body
from swarm_notebook.transport.base import OncePerKey, Refusal, Transport

log = logging.getLogger(__name__)

REPLY = "rpc.reply"
ERROR = "rpc.error"
CANCEL = "rpc.cancel"
OTHER = "(other)"  # counter bucket of message types nobody here handles
_RPC_TYPES = frozenset({REPLY, ERROR, CANCEL})

Handler = Callable[[str, Any], Awaitable[Any] | Any]


@dataclass
class _Registration:
    handler: Handler
    schema: type | None
    is_async: bool


@dataclass
class Reply:
    body: Any
    bytes_out: int
    bytes_in: int


class Endpoint:
    """Typed messaging over a transport.

    >>> endpoint.register_message_handler("echo", lambda peer, body: body)  # doctest: +SKIP
    >>> await endpoint.request(peer_id, "echo", {"x": 1})                   # doctest: +SKIP
    {'x': 1}
    """

    def __init__(self, transport: Transport, *, max_handler_tasks: int = 512) -> None:
        self.transport = transport
        self._handlers: dict[str, _Registration] = {}
        self._pending: dict[str, tuple[str, asyncio.Future[tuple[Any, int]]]] = {}
        self._serving: dict[tuple[str, str], asyncio.Task[Any]] = {}
        self._tasks = OwnedTasks("endpoint-handlers", limit=max_handler_tasks)
        self._ids = itertools.count(1)
        self._prefix = os.urandom(6).hex()
        self.rejections: Counter[str] = Counter()
        self.received: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.refused_by_peers: Counter[str] = Counter()
        self._logged = OncePerKey()
        transport.callbacks.on_message = self._on_message
        transport.callbacks.on_refused = self._on_refused

    @property
    def local_id(self) -> str:
        return self.transport.local_id

    def register_message_handler(
        self, type_: str, handler: Handler, schema: type | None = None
    ) -> None:
        """Handle messages of ``type_``; the return value answers requests."""
        if type_.startswith(("rpc.", "link.")):
            raise ValueError(f"message type {type_!r} is reserved")
        is_async = inspect.iscoroutinefunction(handler)
        self._handlers[type_] = _Registration(handler, schema, is_async)

    def unregister_message_handler(self, type_: str) -> None:
        self._handlers.pop(type_, None)

    def handler_types(self) -> list[str]:
        return sorted(self._handlers)

    def _next_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    async def send(self, peer_id: str, type_: str, body: Any = None) -> int:
        env = Envelope(v=PROTOCOL_VERSION, type=type_, id=self._next_id(), body=body)
        size = await self.transport.send(peer_id, env)
        self.sent[type_] += 1
        return size

    async def broadcast(self, type_: str, body: Any = None, peers: list[str] | None = None) -> int:
        """Send to every connected peer (or ``peers``); returns how many it reached."""
        targets = self.transport.connected_peers() if peers is None else peers
        results = await asyncio.gather(
            *(self.send(peer, type_, body) for peer in targets), return_exceptions=True
        )
        return sum(1 for r in results if not isinstance(r, BaseException))

    async def request(
        self, peer_id: str, type_: str, body: Any = None, *, timeout: float = 30.0
    ) -> Any:
        return (await self.request_detailed(peer_id, type_, body, timeout=timeout)).body

    async def request_detailed(
        self, peer_id: str, type_: str, body: Any = None, *, timeout: float = 30.0
    ) -> Reply:
        """Ask ``peer_id`` and wait for its answer; cancelling this cancels the remote work."""
        msg_id = self._next_id()
        future: asyncio.Future[tuple[Any, int]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = (peer_id, future)
        try:
            env = Envelope(v=PROTOCOL_VERSION, type=type_, id=msg_id, body=body, ask=True)
            sent = self.transport.send_nowait(peer_id, env)
            if sent is None:
                sent = await self.transport.send(peer_id, env)
            # Not held while the reply is awaited: a task's inputs can be a 50 MB frame.
            del env, body
            self.sent[type_] += 1
            try:
                reply_body, received = await asyncio.wait_for(future, timeout)
            except TimeoutError:
                await self._cancel_remote(peer_id, msg_id)
                raise RequestTimeout(
                    f"no reply from peer {peer_id[:16]} to {type_!r} within {timeout:g} s"
                ) from None
            return Reply(reply_body, sent, received)
        except asyncio.CancelledError:
            await asyncio.shield(self._cancel_remote(peer_id, msg_id))
            raise
        finally:
            self._pending.pop(msg_id, None)

    def fail_pending_for(self, peer_id: str, reason: str) -> int:
        """Fail every request waiting on ``peer_id`` at once (its link went down)."""
        failed = 0
        for asked, future in list(self._pending.values()):
            if asked == peer_id and not future.done():
                future.set_exception(PeerUnavailable(f"peer {peer_id[:16]} went away: {reason}"))
                failed += 1
        for (peer, _), task in list(self._serving.items()):
            if peer == peer_id:
                task.cancel()
        return failed

    async def _cancel_remote(self, peer_id: str, msg_id: str) -> None:
        try:
            env = Envelope(v=PROTOCOL_VERSION, type=CANCEL, id=self._next_id(), body=msg_id)
            await self.transport.send(peer_id, env)
        except Exception:
            pass  # the peer is gone; nothing is left to cancel there

    # -- inbound -------------------------------------------------------------------------

    def _on_message(self, peer_id: str, env: Envelope, size: int) -> None:
        # Peer-chosen type strings never become keys: 86k made-up types cost 11 MB.
        known = env.type in self._handlers or env.type in _RPC_TYPES
        self.received[env.type if known else OTHER] += 1
        if env.type in (REPLY, ERROR):
            self._resolve(peer_id, env, size)
            return
        if env.type == CANCEL:
            task = self._serving.get((peer_id, str(env.body)))
            if task is not None:
                task.cancel()
            return
        registration = self._handlers.get(env.type)
        if registration is None:
            self._refuse(peer_id, env, "unknown-type", f"no handler for message type {env.type!r}")
            return
        body = env.body
        if registration.schema is not None:
            try:
                body = convert_body(body, registration.schema)
            except ProtocolError as exc:
                self._refuse(peer_id, env, exc.reason, exc.detail)
                return
        if registration.is_async:
            if self._tasks.full():
                self._refuse(peer_id, env, "busy", "too many requests in progress")
                return
            task = self._tasks.spawn(
                self._run_async(peer_id, env, registration, body), name=env.type
            )
            if env.ask:
                key = (peer_id, env.id)
                self._serving[key] = task
                task.add_done_callback(functools.partial(self._done_serving, key))
            return
        try:
            result = registration.handler(peer_id, body)
        except HandlerRefusal as exc:
            self._refuse(peer_id, env, exc.reason, exc.message)
            return
        except Exception as exc:
            log.exception("handler for %s failed", env.type)
            self._refuse(peer_id, env, "handler-error", f"{type(exc).__name__}: {exc}")
            return
        if env.ask:
            self._reply_soon(peer_id, env, result)

    def _done_serving(self, key: tuple[str, str], _task: asyncio.Task[Any]) -> None:
        self._serving.pop(key, None)

    async def _run_async(self, peer_id: str, env: Envelope, reg: _Registration, body: Any) -> None:
        try:
            result = await reg.handler(peer_id, body)
        except asyncio.CancelledError:
            raise
        except HandlerRefusal as exc:
            self._refuse(peer_id, env, exc.reason, exc.message)
            return
        except Exception as exc:
            log.exception("handler for %s failed", env.type)
            self._refuse(peer_id, env, "handler-error", f"{type(exc).__name__}: {exc}")
            return
        if env.ask:
            await self._send_reply(peer_id, env.id, REPLY, result)

    def _resolve(self, peer_id: str, env: Envelope, size: int) -> None:
        pending = self._pending.get(env.reply_to or "")
        if pending is None or pending[0] != peer_id:
            self.rejections["unmatched-reply"] += 1
            return
        future = pending[1]
        if future.done():
            return
        if env.type == REPLY:
            future.set_result((env.body, size))
            return
        body = env.body if isinstance(env.body, dict) else {}
        future.set_exception(
            RemoteError(peer_id, str(body.get("reason", "error")), str(body.get("message", "")))
        )

    def _on_refused(self, peer_id: str, refusal: Refusal) -> None:
        """The peer refused a message of ours: fail fast instead of waiting for a reply."""
        self.refused_by_peers[refusal.reason] += 1
        pending = self._pending.get(refusal.message_id or "")
        if pending is not None and pending[0] == peer_id:
            if not pending[1].done():
                pending[1].set_exception(
                    RemoteError(
                        peer_id, refusal.reason, f"the peer refused the request: {refusal.detail}"
                    )
                )
            return
        if refusal.message_type == REPLY and refusal.reply_to and not self._tasks.full():
            # Our answer was refused (too large for the asker...): say so in a small error.
            body = {
                "reason": refusal.reason,
                "message": f"your side refused the reply: {refusal.detail}",
            }
            self._tasks.spawn(
                self._send_reply(peer_id, refusal.reply_to, ERROR, body), name="rpc-refused"
            )

    def _refuse(self, peer_id: str, env: Envelope, reason: str, message: str) -> None:
        self.rejections[reason] += 1
        if self._logged.first(peer_id, reason):
            log.info(
                "refused %.40s from %s: %s %s (further ones not logged)",
                env.type,
                peer_id[:16],
                reason,
                message,
            )
        if env.ask:
            self._reply_soon(peer_id, env, {"reason": reason, "message": message}, ERROR)

    def _reply_soon(self, peer_id: str, env: Envelope, body: Any, kind: str = REPLY) -> None:
        reply = Envelope(
            v=PROTOCOL_VERSION, type=kind, id=self._next_id(), reply_to=env.id, body=body
        )
        try:
            if self.transport.send_nowait(peer_id, reply) is not None:
                return
        except (msgspec.EncodeError, TypeError):
            pass  # the slow path below reports an unencodable reply properly
        if self._tasks.full():
            self.rejections["reply-dropped-busy"] += 1
            return
        self._tasks.spawn(self._send_reply(peer_id, env.id, kind, body), name="rpc-reply")

    async def _send_reply(self, peer_id: str, reply_to: str, kind: str, body: Any) -> None:
        env = Envelope(
            v=PROTOCOL_VERSION, type=kind, id=self._next_id(), reply_to=reply_to, body=body
        )
        try:
            await self.transport.send(peer_id, env)
        except PeerUnavailable:
            self.rejections["reply-undeliverable"] += 1
        except (ProtocolError, msgspec.EncodeError, TypeError, OverflowError) as exc:
            # The answer itself could not travel (too large, not encodable): say so.
            if kind == REPLY:
                await self._send_reply(
                    peer_id, reply_to, ERROR, {"reason": "bad-reply", "message": str(exc)[:500]}
                )

    async def close(self) -> None:
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(PeerUnavailable("endpoint closed"))
        await self._tasks.close()
