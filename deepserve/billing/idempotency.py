"""`Idempotency-Key`: a retried POST gets the first answer again, and is charged once.

The official SDKs retry on timeouts, 409, 429 and 5xx; with this header a retry of a request that was
answered replays the stored answer (status, headers, body; a stream's whole SSE body) instead of generating
and charging again. While the first is still being answered a duplicate gets 409. Only successful (2xx),
complete answers are stored: a failed or cut-off request may be retried for real. The key is scoped to the
caller's credential (its sha256) and bound to the request (method, path, body): the same key with another
body gets 422. Stored answers are kept for 24 hours.

The claim is a row inserted with ON CONFLICT DO NOTHING, so of two racing requests exactly one wins on any
number of replicas; a claim left by a process that died is removed with its reservations.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepserve.api.auth import api_key_header, bearer_token
from deepserve.api.direct import BODY_RECORDED_KEY
from deepserve.api.bodies import raise_when_read, read_body, replaying
from deepserve.billing.tables import IdempotencyRecord, utcnow
from deepserve.errors import ConflictError, DeepserveError, IdempotencyMismatchError, InvalidRequestError

HEADER = "idempotency-key"
REPLAYED_HEADER = "idempotent-replayed"
MAX_KEY_LENGTH = 255
KEEP_FOR = dt.timedelta(hours=24)
_NOT_REPLAYED = {b"content-length", b"date", b"server"}

log = logging.getLogger(__name__)
records = IdempotencyRecord.__table__


@dataclass(slots=True)
class Stored:
    status_code: int
    headers: list[tuple[str, str]]
    body: bytes


def _insert(engine: Engine):
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(records)


def claim(engine: Engine, scope: str, key: str, fingerprint: str, instance_id: str) -> str | Stored:
    """"claimed" (go ahead), "in_flight", "mismatch", or the stored answer to replay."""
    with engine.begin() as conn:
        inserted = conn.execute(
            _insert(engine).values(scope=scope, key=key, fingerprint=fingerprint, state="in_flight",
                                   instance_id=instance_id, created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["scope", "key"])
            .returning(records.c.key)  # a row back means this caller won (rowcount is not portable here)
        ).first()
        if inserted is not None:
            return "claimed"
        row = conn.execute(sa.select(records).where(records.c.scope == scope, records.c.key == key)).one()
    if row.fingerprint != fingerprint:
        return "mismatch"
    if row.state != "done":
        return "in_flight"
    return Stored(row.status_code, [tuple(h) for h in json.loads(row.headers)], row.body)


def finish(engine: Engine, scope: str, key: str, answer: Stored) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.update(records).where(records.c.scope == scope, records.c.key == key)
            .values(state="done", status_code=answer.status_code, headers=json.dumps(answer.headers),
                    body=answer.body)
        )


def abandon(engine: Engine, scope: str, key: str) -> None:
    with engine.begin() as conn:
        conn.execute(sa.delete(records).where(records.c.scope == scope, records.c.key == key,
                                              records.c.state == "in_flight"))


def prune(engine: Engine) -> int:
    with engine.begin() as conn:
        return conn.execute(sa.delete(records).where(records.c.created_at < utcnow() - KEEP_FOR,
                                                     records.c.state == "done")).rowcount


class IdempotencyMiddleware:
    """ASGI middleware; only POSTs that carry an `Idempotency-Key` and a credential pay for it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        key = request.headers.get(HEADER)
        credential = bearer_token(request) or api_key_header(request)
        state = scope["app"].state
        meter = getattr(state, "meter", None)
        if key is None or credential is None or meter is None:
            await self.app(scope, receive, send)
            return
        if not key or len(key) > MAX_KEY_LENGTH:
            await self._error(scope, receive, send, InvalidRequestError(
                f"The Idempotency-Key header must be 1 to {MAX_KEY_LENGTH} characters long.", param="Idempotency-Key"))
            return
        try:
            body, messages, disconnected = await read_body(receive)
        except Exception as exc:  # past the size limit: the route's read raises it again and answers it (413)
            await self.app(scope, raise_when_read(exc), send)
            return
        if disconnected:
            return
        replay_receive = replaying(messages, receive)
        try:  # a replay is for a caller whose key still works (a revoked key gets its 401 from the route)
            authenticated = state.key_store.authenticate(credential)
            if asyncio.iscoroutine(authenticated):
                await authenticated
        except DeepserveError:
            await self.app(scope, replay_receive, send)
            return
        owner = hashlib.sha256(b"credential\0" + credential.encode()).hexdigest()
        fingerprint = hashlib.sha256(
            b"\0".join([scope["method"].encode(), scope["path"].encode(), scope.get("query_string", b""), body])
        ).hexdigest()
        db = meter.db
        outcome = await db.run(claim, owner, key, fingerprint, meter.instance_id)
        if isinstance(outcome, Stored):
            await _replay(outcome, send)
            return
        if outcome == "in_flight":
            await self._error(scope, replay_receive, send, ConflictError(
                "A request with this Idempotency-Key is still being answered. Retry once it has finished to "
                "get its answer."))
            return
        if outcome == "mismatch":
            await self._error(scope, replay_receive, send, IdempotencyMismatchError(
                "This Idempotency-Key was already used for a different request (method, path or body). "
                "Use a new key for a new request."))
            return
        answer = Stored(0, [], b"")
        chunks: list[bytes] = []
        stored = False

        async def capturing_send(message: Message) -> None:
            nonlocal stored
            if message["type"] == "http.response.start":
                answer.status_code = message["status"]
                answer.headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])
                                  if k.lower() not in _NOT_REPLAYED]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False) and 200 <= answer.status_code < 300:
                    # Stored before the answer's last bytes leave: a client that has the whole answer and sends its
                    # duplicate at once (another replica, a retry) gets the replay, never a 409 "still answered".
                    answer.body = b"".join(chunks)
                    try:
                        await _shielded(db.run(finish, owner, key, answer))
                        stored = True
                    except Exception:  # the answer still goes out; the key is released below (a retry runs)
                        log.exception("could not store the answer of an Idempotency-Key request")
            await send(message)

        scope[BODY_RECORDED_KEY] = True  # every body byte must pass capturing_send: no direct writes (api/direct.py)
        try:
            await self.app(scope, replay_receive, capturing_send)
        finally:
            if not stored:
                await _shielded(db.run(abandon, owner, key))

    async def _error(self, scope: Scope, receive: Receive, send: Send, error: DeepserveError) -> None:
        response = scope["app"].state.errors.render(Request(scope), error)
        await response(scope, receive, send)


async def _shielded(work) -> None:
    await asyncio.shield(asyncio.ensure_future(work))


async def _replay(answer: Stored, send: Send) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers]
    headers += [(b"content-length", str(len(answer.body)).encode()), (REPLAYED_HEADER.encode(), b"true")]
    await send({"type": "http.response.start", "status": answer.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body, "more_body": False})
