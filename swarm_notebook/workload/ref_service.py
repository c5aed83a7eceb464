"""Resident data on the serving side: keep refs peers put here and feed them to their tasks.

Handlers: ``ref-put`` (the owner stores a value here), ``ref-get`` (the owner, or a peer
holding the ref's token, reads it back), ``ref-pull`` (the owner tells us to copy a ref
from another holder, peer to peer) and ``ref-release``. A task naming refs in
``data["refs"]`` gets them as encoded inputs, but only refs its own delegator put
(``ref-forbidden`` otherwise); ``data["keep"]`` names outputs that stay here as new refs of
the delegator, answered as descriptors instead of values.

Every payload is checked before it is kept: its content hash, that it is msgpack of the
safe codec's shape, and that decoding it would fit the store's budget (declared sizes,
charged before anything is decompressed): ``malformed`` or ``too-large`` otherwise.
"""

from __future__ import annotations

import functools
import logging
import secrets
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from swarm_notebook.errors import HandlerRefusal, RefError, RemoteError, SwarmError, ValueCodecError
from swarm_notebook.membership.node import SwarmNode
from swarm_notebook.protocol.values import DecodeBudget, decode_value
from swarm_notebook.reasons import Reason
from swarm_notebook.workload.executors.base import ResidentInput
from swarm_notebook.workload.messages import (
    MAX_REF_IDS,
    REF_GET,
    REF_PULL,
    REF_PUT,
    REF_RELEASE,
    RefGet,
    RefPull,
    RefPut,
    RefRelease,
)
from swarm_notebook.workload.store import RefStore, StoredRef, content_digest

log = logging.getLogger(__name__)

Notify = Callable[[str, dict[str, Any]], None]
PULL_TIMEOUT_S = 120.0


def describe_stored(
    ref_id: str, size: int, digest: str, token: str, dtypes: dict[str, str]
) -> dict[str, Any]:
    """The descriptor a holder answers for a ref it keeps (a kept output, a put)."""
    return {"ref_id": ref_id, "size": size, "digest": digest, "token": token, "dtypes": dtypes}


class RefService:
    """The holder's handlers and the task server's hooks for refs."""

    def __init__(self, node: SwarmNode, store: RefStore, notify: Notify) -> None:
        self.node = node
        self.store = store
        self.notify = notify
        self.refusals: Counter[str] = Counter()
        self.bytes_received = 0
        self.bytes_served = 0
        endpoint = node.endpoint
        endpoint.register_message_handler(REF_PUT, self._on_put, schema=RefPut)
        endpoint.register_message_handler(REF_GET, self._on_get, schema=RefGet)
        endpoint.register_message_handler(REF_PULL, self._on_pull, schema=RefPull)
        endpoint.register_message_handler(REF_RELEASE, self._on_release, schema=RefRelease)
        node.add_listener(self._peer_changed)

    def _refusal(self, exc: SwarmError) -> HandlerRefusal:
        self.refusals[str(exc.reason)] += 1
        return HandlerRefusal(exc.reason, exc.message)

    def _peer_changed(self, peer_id: str, what: str) -> None:
        if what == "down":
            # Release on leave: an owner that left can never use its refs here again.
            if self.store.release_owner(peer_id):
                self.notify("refs:changed", {"peer_id": peer_id})

    # -- handlers ----------------------------------------------------------------------

    def _check_payload(self, ref_id: str, payload: bytes) -> None:
        """Refuse bytes that are not a safe-codec value fitting the store's budget."""
        try:
            structure = msgspec.msgpack.decode(payload)
        except msgspec.DecodeError as exc:
            raise RefError(Reason.MALFORMED, f"ref {ref_id}: not msgpack: {exc}", ref_id) from exc
        try:
            # Declared sizes are charged before anything is decompressed: a small buffer
            # that claims gigabytes is too-large here, never an allocation. Decoding holds
            # the Arrow buffers and the pandas copy: twice the stored bytes.
            decode_value(structure, budget=DecodeBudget(max(2 * self.store.max_bytes, 1)))
        except ValueCodecError as exc:
            raise RefError(exc.reason, f"ref {ref_id}: {exc.message}", ref_id) from exc

    def _store(
        self,
        owner: str,
        ref_id: str,
        payload: bytes,
        digest: str,
        token: str,
        dtypes: dict[str, str],
    ) -> dict[str, Any]:
        if content_digest(payload) != digest:
            raise RefError(Reason.MALFORMED, f"ref {ref_id}: bytes do not match its hash", ref_id)
        if len(payload) > self.store.max_bytes + self.store.max_spill_bytes:
            raise RefError(
                Reason.STORE_FULL,
                f"ref {ref_id} ({len(payload)} bytes) is larger than this peer's whole store",
                ref_id,
            )
        self._check_payload(ref_id, payload)
        entry = self.store.put(owner, ref_id, payload, digest=digest, token=token, dtypes=dtypes)
        self.bytes_received += len(payload)
        self.notify("refs:changed", {"ref_id": ref_id})
        return {"ref_id": ref_id, "size": entry.size, "spilled": entry.spilled}

    def _on_put(self, peer_id: str, put: RefPut) -> dict[str, Any]:
        try:
            return self._store(peer_id, put.ref_id, put.payload, put.digest, put.token, put.dtypes)
        except RefError as exc:
            raise self._refusal(exc) from exc

    def _on_get(self, peer_id: str, get: RefGet) -> dict[str, Any]:
        try:
            if get.owner is None or get.owner == peer_id:
                entry = self.store.lookup(peer_id, get.ref_id)
            else:
                entry = self.store.lookup(get.owner, get.ref_id)
                if get.token is None or not secrets.compare_digest(get.token, entry.token):
                    raise RefError(
                        Reason.REF_FORBIDDEN,
                        f"ref {get.ref_id} belongs to another peer",
                        get.ref_id,
                    )
            payload = self.store.payload(entry)
        except RefError as exc:
            raise self._refusal(exc) from exc
        self.bytes_served += len(payload)
        return {"ref_id": entry.ref_id, "digest": entry.digest, "payload": payload}

    async def _on_pull(self, peer_id: str, pull: RefPull) -> dict[str, Any]:
        # The owner asked (its link is authenticated), so what we copy is kept as its.
        try:
            existing = self.store.lookup(peer_id, pull.ref_id)
            return {"ref_id": pull.ref_id, "size": existing.size, "copied": False}
        except RefError:
            pass
        try:
            reply = await self.node.endpoint.request(
                pull.source,
                REF_GET,
                {"ref_id": pull.ref_id, "owner": peer_id, "token": pull.token},
                timeout=PULL_TIMEOUT_S,
            )
        except RemoteError as exc:
            self.refusals[str(exc.reason)] += 1
            raise HandlerRefusal(
                exc.reason, f"copy from {pull.source[:16]}: {exc.message}"
            ) from exc
        except SwarmError as exc:
            self.refusals[str(exc.reason)] += 1
            raise HandlerRefusal(
                Reason.PEER_UNAVAILABLE, f"copy from {pull.source[:16]} failed: {exc}"
            ) from exc
        payload = reply.get("payload") if isinstance(reply, dict) else None
        if not isinstance(payload, bytes):
            raise self._refusal(RefError(Reason.MALFORMED, "the holder sent no bytes", pull.ref_id))
        try:
            stored = self._store(
                peer_id, pull.ref_id, payload, pull.digest, pull.token, pull.dtypes
            )
        except RefError as exc:
            raise self._refusal(exc) from exc
        return {**stored, "copied": True}

    def _on_release(self, peer_id: str, release: RefRelease) -> dict[str, Any]:
        released = sum(self.store.release(peer_id, r) for r in release.ref_ids)
        if released:
            self.notify("refs:changed", {"released": released})
        return {"released": released}

    # -- task hooks --------------------------------------------------------------------

    def resolve(
        self, peer_id: str, data: Any
    ) -> tuple[Any, list[str], dict[str, ResidentInput]]:
        """``data`` without its refs, the outputs to keep, and the refs as resident inputs.

        Each ref input comes back as a ``ResidentInput`` (content digest + a reader of its
        encoded bytes) so an executor that keeps values between tasks need not read, copy
        and send the data again. Raises ``HandlerRefusal`` (``ref-not-found``,
        ``ref-forbidden``, ``bad-input``) naming the ref.
        """
        if not isinstance(data, dict) or ("refs" not in data and "keep" not in data):
            return data, [], {}
        data = dict(data)
        refs = data.pop("refs", None) or {}
        keep = data.pop("keep", None) or []
        if not isinstance(refs, dict) or len(refs) > MAX_REF_IDS:
            raise self._refusal(
                RefError(Reason.BAD_INPUT, "'refs' must map input names to ref ids")
            )
        if not isinstance(keep, list) or not all(isinstance(k, str) for k in keep):
            raise self._refusal(RefError(Reason.BAD_INPUT, "'keep' must be a list of output names"))
        resident: dict[str, ResidentInput] = {}
        for name, ref_id in refs.items():
            if not isinstance(name, str) or not isinstance(ref_id, str):
                raise self._refusal(RefError(Reason.BAD_INPUT, "'refs' must map names to ref ids"))
            try:
                entry = self.store.lookup(peer_id, ref_id)
            except RefError as exc:
                raise self._refusal(exc) from exc
            resident[name] = ResidentInput(
                entry.digest, entry.size, functools.partial(self._encoded_input, entry)
            )
        outputs = list(data.get("outputs") or [])
        data["outputs"] = outputs + [k for k in keep if k not in outputs]
        return data, keep, resident

    def _encoded_input(self, entry: StoredRef) -> Any:
        """A stored ref's value in its encoded form, as a task input travels."""
        try:
            return msgspec.msgpack.decode(self.store.payload(entry))
        except msgspec.DecodeError as exc:  # checked on put; a damaged spill file
            raise RefError(Reason.MALFORMED, f"ref {entry.ref_id}: {exc}", entry.ref_id) from exc

    @staticmethod
    def merge_inputs(data: Any, resident: Mapping[str, ResidentInput]) -> Any:
        """``data`` with ``resident`` read into its inputs, for executors that keep nothing."""
        if not resident:
            return data
        inputs = dict(data.get("inputs") or {})
        inputs.update({name: r.load() for name, r in resident.items()})
        return {**data, "inputs": inputs}

    def keep_outputs(self, peer_id: str, result: dict[str, Any], keep: list[str]) -> dict[str, Any]:
        """Move the ``keep`` outputs of a successful result into the store as refs."""
        outputs = result.get("outputs")
        if not keep or not result.get("success") or not isinstance(outputs, dict):
            return result
        kept: dict[str, Any] = {}
        remaining = dict(outputs)
        for name in keep:
            if name not in remaining:
                continue
            payload = msgspec.msgpack.encode(remaining.pop(name))
            ref_id = uuid.uuid4().hex
            token = secrets.token_hex(16)
            digest = content_digest(payload)
            try:
                entry = self.store.put(peer_id, ref_id, payload, digest=digest, token=token)
            except RefError as exc:
                self.refusals[str(exc.reason)] += 1
                return {
                    **result,
                    "success": False,
                    "error": f"output {name!r} cannot stay here: {exc.message}",
                    "error_type": str(exc.reason),
                    "outputs": {},
                }
            kept[name] = describe_stored(ref_id, entry.size, digest, token, {})
        if kept:
            self.notify("refs:changed", {"kept": len(kept)})
        return {**result, "outputs": remaining, "kept": kept}

    def stats(self) -> dict[str, Any]:
        return {
            **self.store.stats(),
            "bytes_received": self.bytes_received,
            "bytes_served": self.bytes_served,
            # Puts, pulls and reads refused here, by reason (store-full, ref-forbidden, ...).
            "refusals": dict(self.refusals),
        }
