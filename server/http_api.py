"""The HTTP API: the original service's routes and more, as a plain ASGI app.

``ango serve`` runs it under uvicorn (httptools) on the same event loop as the
binary protocol server and over the same :class:`ango.Allocator`
(``server/http_server.py``). Every route is in ``ROUTES`` and documented in
``server/openapi.json`` (also ``docs/openapi.json``), served at
``/openapi.json``. Every error body is ``{"error": "<stable code>",
"message": "..."}``. No SQL here: claims go through the Allocator, the rest
through ango's library functions.

A plain ASGI app rather than Starlette: measured on this machine (uvicorn,
httptools, uvloop, wrk -c100, the redeem route answering a constant) it served
about 27k requests/s against Starlette's 16k, and the routing here is a dict.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

import msgspec
import psycopg
from python_multipart.multipart import parse_options_header

from ango.errors import (
    AngoError,
    AuthenticationFailed,
    BatchExhausted,
    BatchExpired,
    BatchNotFound,
    BatchNotStarted,
    ImportFailed,
    InvalidInput,
    RuleViolation,
    Unavailable,
)
from ango.importer import ImportResult, parse_uuid
from ango.tokens import ADMIN, Authenticator, Scope

from .http_export import Spout, Streamed, run_export
from .http_upload import TooLarge, TopUp, Upload, UploadError
from .protocol_server import NOOP_CODE

log = logging.getLogger("ango.server.http")

JSON = b"application/json"


class MetricsLike(Protocol):
    """What the HTTP API needs of ``server.metrics.Metrics`` (all hooks get protocol="http")."""

    def exposition(self) -> tuple[bytes, str]: ...
    def observe_claim(self, outcome: str, seconds: float) -> None: ...
    def connection_opened(self, protocol: str) -> None: ...
    def connection_closed(self, protocol: str) -> None: ...
    def auth_failed(self, protocol: str, address: str | None = None) -> None: ...
    def import_rows(self, n: int) -> None: ...


class AuthGuard(Protocol):
    """Counts wrong tokens per address (the protocol server's, shared by both protocols)."""

    def auth_failed(self, address: str) -> float:
        """Count one; return how long to wait before answering it."""


@dataclass(frozen=True)
class HttpLimits:
    """Limits of the HTTP API; breaking one gets a JSON error, never a hang."""

    #: Largest JSON request body, in bytes (413 beyond).
    max_json_body: int = 64 * 1024
    #: Largest upload body, in bytes (413 beyond).
    max_upload_bytes: int = 16 * 1024**3
    #: Uploads imported at once (503 with Retry-After beyond): each holds a thread
    #: and a PostgreSQL connection for its duration.
    max_uploads: int = 2
    #: Exports streamed at once (503 with Retry-After beyond): each holds a thread
    #: and a PostgreSQL connection until its client has read it all.
    max_exports: int = 2
    #: Seconds a streamed answer (an export) may wait for a client that reads
    #: nothing before it is stopped and the connection closed.
    send_timeout: float = 30.0
    #: Bytes of request line and headers (431 beyond).
    max_header_bytes: int = 16 * 1024
    #: Seconds from a connection's first byte (or a request's) to its headers' end (408).
    header_timeout: float = 10.0
    #: Seconds a request body may stay silent before it is answered 408 and closed.
    body_timeout: float = 30.0
    #: Seconds an idle keep-alive connection is kept.
    keep_alive_timeout: int = 60
    #: Open HTTP connections; one more is answered 503 and closed.
    max_connections: int = 1024
    #: Seconds before a wrong token is answered when no protocol server counts
    #: wrong tokens per address (with one, its growing delay applies).
    auth_failure_delay: float = 0.25
    #: Seconds a database probe's answer is reused (/healthcheck, /readyz are open).
    probe_cache: float = 1.0
    #: Seconds a database probe may take before PostgreSQL counts as unreachable.
    probe_timeout: float = 3.0
    #: Seconds a shutdown waits for requests in flight.
    shutdown_grace: float = 30.0


class HttpError(Exception):
    """An HTTP error answer: status, stable code, message, extra headers."""

    def __init__(self, status: int, code: str, message: str,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or []


#: The status of each error a caller can act on (anything else is a 500).
STATUS_OF: dict[type[AngoError], int] = {
    InvalidInput: 400, ImportFailed: 400, UploadError: 400, AuthenticationFailed: 401,
    RuleViolation: 403, BatchNotFound: 404, BatchExhausted: 404, BatchExpired: 410,
    # A claim before the batch's start: 409 (the batch's state, not the customer's
    # rule, 403, and not gone, 410); the same claim succeeds once the batch starts.
    BatchNotStarted: 409, TooLarge: 413, Unavailable: 503,
}
_RETRY_AFTER = [(b"retry-after", b"1")]


def error_body(code: str, message: str) -> bytes:
    """The JSON body of every error answer."""
    return msgspec.json.encode({"error": code, "message": message})


def http_error(exc: BaseException) -> HttpError:
    """The answer for an exception raised while serving a request."""
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, psycopg.OperationalError):
        # PostgreSQL unreachable or restarting (batches, expiry, uploads): retry later.
        return HttpError(503, Unavailable.code, "the database cannot be reached; retry later",
                         _RETRY_AFTER)
    if isinstance(exc, AngoError):
        # The nearest class with a status: subclasses (DatabaseUnavailable is an
        # Unavailable, ImportInterrupted an ImportFailed) answer like their parent.
        status = next((STATUS_OF[k] for k in type(exc).__mro__ if k in STATUS_OF), 500)
        if status == 500:
            return HttpError(500, "internal", "internal error")
        return HttpError(status, exc.code, str(exc),
                         _RETRY_AFTER if exc.retryable else None)
    return HttpError(500, "internal", "internal error")


class RedeemBody(msgspec.Struct):
    """The original's claim request; ``requestid`` (or Idempotency-Key) is Ango's."""

    batchid: str
    customerid: str
    clientid: str | None = None
    requestid: str | None = None


class RulesBody(msgspec.Struct, forbid_unknown_fields=True):
    """``PUT /api/v1/batches/{id}/rules``: the new rules, or null for none."""

    rules: dict[str, Any] | None


class ScheduleBody(msgspec.Struct, forbid_unknown_fields=True):
    """``PUT /api/v1/batches/{id}/schedule``: a field left out keeps its value, null clears it."""

    starts_at: str | None | msgspec.UnsetType = msgspec.UNSET
    expires_at: str | None | msgspec.UnsetType = msgspec.UNSET


_redeem_decoder = msgspec.json.Decoder(RedeemBody)
_rules_decoder = msgspec.json.Decoder(RulesBody)
_schedule_decoder = msgspec.json.Decoder(ScheduleBody)
_encode = msgspec.json.encode


@dataclass(frozen=True)
class Route:
    """One route: method, path template, handler method name, open without a token."""

    method: str
    path: str
    handler: str
    open: bool = False


#: Every route of the app; the OpenAPI document lists each (a test checks).
ROUTES: tuple[Route, ...] = (
    Route("POST", "/api/v1/code/redeem", "redeem"),
    Route("GET", "/api/v1/batches", "list_batches"),
    Route("GET", "/api/v1/batches/{id}", "get_batch"),
    Route("POST", "/api/v1/batches/{id}/expire", "expire_batch"),
    Route("POST", "/api/v1/codes/upload", "upload"),
    # The life of a batch and of a code (issue 14): the admin token's, as over the
    # binary protocol (export also a client token's, for its own batches).
    Route("GET", "/api/v1/codes/{code}", "lookup"),
    Route("GET", "/api/v1/customers/{customer_id}/codes", "customer_codes"),
    Route("PUT", "/api/v1/batches/{id}/rules", "set_rules"),
    Route("PUT", "/api/v1/batches/{id}/schedule", "set_schedule"),
    Route("DELETE", "/api/v1/batches/{id}", "delete_batch"),
    Route("GET", "/api/v1/batches/{id}/export", "export"),
    Route("POST", "/api/v1/batches/{id}/codes", "top_up"),
    Route("GET", "/api/v1/stats", "stats"),
    Route("GET", "/healthcheck", "healthcheck", open=True),
    Route("GET", "/readyz", "readyz", open=True),
    Route("GET", "/livez", "livez", open=True),
    Route("GET", "/metrics", "metrics", open=True),
    Route("GET", "/openapi.json", "openapi", open=True),
)


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$")


class Request:
    """What a handler sees of one request."""

    __slots__ = ("scope", "receive", "headers", "params", "body_done", "peer", "access")

    def __init__(self, scope: dict, receive: Callable[[], Awaitable[dict]]) -> None:
        self.scope = scope
        self.receive = receive
        self.headers: dict[bytes, bytes] = dict(scope["headers"])
        self.params: dict[str, str] = {}
        self.access: Scope = ADMIN  # what the token reaches (set by HttpApi.authorize)
        headers = self.headers
        # A request without a body has read it all already.
        self.body_done = (headers.get(b"content-length", b"0") == b"0"
                          and b"transfer-encoding" not in headers)
        client = scope.get("client")
        self.peer = client[0] if client else "?"

    async def body(self, limit: int) -> bytes:
        """The whole body; 413 beyond ``limit`` bytes."""
        length = self.headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise HttpError(413, TooLarge.code, f"the body is larger than {limit} bytes")
        chunks = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise HttpError(400, "disconnected", "the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise HttpError(413, TooLarge.code, f"the body is larger than {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                self.body_done = True
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def query(self, name: str) -> str | None:
        """The (percent-decoded) value of ``name`` in the query string, if given."""
        query = self.scope.get("query_string", b"")
        if not query:
            return None
        # Bytes that are not UTF-8 become lone surrogates, which the library's
        # text check refuses naming the position.
        text = query.decode("utf-8", "surrogateescape")
        for key, value in urllib.parse.parse_qsl(text, keep_blank_values=True,
                                                 encoding="utf-8", errors="surrogateescape"):
            if key == name:
                return value
        return None

    def query_flag(self, name: str) -> bool:
        """True for ``name=true`` (or 1, yes, or the bare name), False for false (0, no)
        or its absence; anything else is a 400 (a typo must not turn a flag off)."""
        value = self.query(name)
        if value is None or value.lower() in ("false", "0", "no"):
            return False
        if value.lower() in ("", "1", "true", "yes"):
            return True
        raise InvalidInput(f"query parameter {name} must be true or false, got {value[:40]!r}")


class HttpApi:
    """The ASGI app. ``allocator`` None serves claims with a constant code (``--noop``)."""

    def __init__(self, allocator: Any | None, *, token: str | None, no_auth: bool = False,
                 limits: HttpLimits | None = None, metrics: MetricsLike | None = None,
                 auth_guard: AuthGuard | None = None, authenticator: Authenticator | None = None,
                 extra_stats: Callable[[], dict[str, Any]] | None = None,
                 health: Callable[[], dict[str, Any]] | None = None) -> None:
        if not token and not no_auth:
            raise ValueError("a token is required unless no_auth is set")
        self.allocator = allocator
        # The binary protocol's Authenticator when given (client tokens included),
        # else one that knows the admin token only.
        self.auth = authenticator or Authenticator(token or "")
        self.no_auth = no_auth
        self.health = health
        self.limits = limits or HttpLimits()
        self.metrics = metrics
        self.auth_guard = auth_guard
        self.extra_stats = extra_stats
        by_path: dict[str, dict[str, Route]] = {}
        for route in ROUTES:
            by_path.setdefault(route.path, {})[route.method] = route
        self._exact = {path: methods for path, methods in by_path.items() if "{" not in path}
        self._templated = [(_pattern(path), methods) for path, methods in by_path.items()
                           if "{" in path]
        self._handlers = {route.handler: getattr(self, "_" + route.handler) for route in ROUTES}
        self._openapi = resources.files(__package__).joinpath("openapi.json").read_bytes()
        self._upload_pool = ThreadPoolExecutor(self.limits.max_uploads,
                                               thread_name_prefix="ango-upload")
        self._uploads = 0
        self._export_pool = ThreadPoolExecutor(self.limits.max_exports,
                                               thread_name_prefix="ango-export")
        self._exports = 0
        # Open routes must not let a flood of probes reach PostgreSQL or the shards.
        self._database = Cached(self._check_database, self.limits.probe_cache)
        self._shards = Cached(self._shards_alive, self.limits.probe_cache)
        self.requests = 0
        self.responses: dict[int, int] = {}
        self.connections = 0

    # --- ASGI -----------------------------------------------------------------------

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        """Serve one request."""
        if scope["type"] != "http":
            return
        self.requests += 1
        request: Request | None = None
        try:
            request = Request(scope, receive)
            route, request.params = self._match(scope["path"], scope["method"],
                                                scope.get("raw_path"))
            access = self.authorize(route, request.headers)
            if access is None:
                await self._refuse(request)
            request.access = access
            status, body, headers = await self._handlers[route.handler](request)
        except Exception as exc:  # every failure becomes a JSON answer
            error = http_error(exc)
            if error.status == 500:
                log.exception("HTTP %s %s failed", scope["method"], scope["path"])
            status, body, headers = error.status, error_body(error.code, error.message), \
                error.headers
        if body is None:
            return  # the client went away
        self.responses[status] = self.responses.get(status, 0) + 1
        if body.__class__ is Streamed:
            await body.send(send, request.receive, status, self.limits.send_timeout)
            return
        content_type = JSON
        if headers:
            headers = list(headers)
            for i, (name, value) in enumerate(headers):
                if name == b"content-type":  # a handler's own type (/metrics)
                    content_type = value
                    del headers[i]
                    break
        out = [(b"content-type", content_type), (b"content-length", b"%d" % len(body)),
               *headers]
        if request is None or not request.body_done:
            # The body was not read to its end: the connection cannot carry another request.
            out.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": body})

    def _match(self, path: str, method: str,
               raw_path: bytes | None = None) -> tuple[Route, dict[str, str]]:
        methods = self._exact.get(path)
        params: dict[str, str] = {}
        if methods is None:
            # Matched on the raw path: a code or customer id may hold an encoded "/".
            raw = path if raw_path is None else raw_path.decode("latin-1")
            for pattern, candidates in self._templated:
                found = pattern.match(raw)
                if found:
                    methods = candidates
                    params = {name: urllib.parse.unquote(value, errors="surrogateescape")
                              for name, value in found.groupdict().items()}
                    break
            else:
                raise HttpError(404, "not_found", f"no route {path}")
        route = methods.get(method)
        if route is None:
            allowed = ", ".join(sorted(methods))
            raise HttpError(405, "method_not_allowed",
                            f"{method} is not allowed on {path} (allowed: {allowed})",
                            [(b"allow", allowed.encode())])
        return route, params

    # --- auth -----------------------------------------------------------------------

    def authorize(self, route: Route, headers: dict[bytes, bytes]) -> Scope | None:
        """What a request may reach (None: refused): the one place the HTTP API decides.

        Open routes (health, readiness, metrics, the OpenAPI document) need no
        token; the others need ``Authorization: Bearer <token>``: the admin token
        or a client token (``ango token create``), the binary protocol's tokens,
        unless ``--http-no-auth`` (every request then acts as the admin).
        """
        if route.open or self.no_auth:
            return ADMIN
        value = headers.get(b"authorization")
        if value is None or value[:7].lower() != b"bearer ":
            return None
        try:
            token = value[7:].strip().decode()
        except UnicodeDecodeError:
            return None
        return self.auth.lookup(token)

    async def _refuse(self, request: Request) -> None:
        """401 after a delay that grows with the address's recent wrong tokens (both
        protocols counted together); a correct token is never refused for them."""
        if self.metrics is not None:
            self.metrics.auth_failed("http", request.peer)
        delay = self.limits.auth_failure_delay
        if self.auth_guard is not None:
            delay = self.auth_guard.auth_failed(request.peer)
        await asyncio.sleep(delay)
        raise HttpError(401, AuthenticationFailed.code,
                        "missing or wrong token: send 'Authorization: Bearer <token>'",
                        [(b"www-authenticate", b'Bearer realm="ango"')])

    # --- routes ---------------------------------------------------------------------

    async def _json_body(self, request: Request, decoder: msgspec.json.Decoder) -> Any:
        """The request's JSON body decoded; 415, 413 or 400 saying what is wrong."""
        content_type = request.headers.get(b"content-type")
        if content_type is not None and not _is_json(content_type):
            raise HttpError(415, "unsupported_media_type",
                            "the body must be JSON (Content-Type: application/json)")
        body = await request.body(self.limits.max_json_body)
        try:
            return decoder.decode(body)
        except msgspec.ValidationError as exc:
            raise HttpError(400, InvalidInput.code, f"invalid field: {exc}") from None
        except msgspec.DecodeError as exc:
            raise HttpError(400, "malformed_json", f"cannot parse json: {exc}") from None

    async def _redeem(self, request: Request) -> tuple[int, bytes, list]:
        msg = await self._json_body(request, _redeem_decoder)
        request_id = msg.requestid
        key = request.headers.get(b"idempotency-key")
        if key is not None:
            key_text = key.decode("latin-1")
            if request_id is not None and request_id != key_text:
                raise HttpError(400, InvalidInput.code,
                                "Idempotency-Key and requestid differ; send one of them")
            request_id = key_text
        if self.allocator is None:
            return 200, b'{"code":"%s"}' % NOOP_CODE.encode(), []
        metrics = self.metrics
        started = time.perf_counter() if metrics is not None else 0.0
        try:
            client_id = request.access.claim_client(msg.batchid, msg.clientid)
            code = await self.allocator.claim(msg.batchid, msg.customerid,
                                              client_id=client_id, request_id=request_id)
        except AngoError as exc:
            if metrics is not None:
                metrics.observe_claim(exc.code, time.perf_counter() - started)
            raise
        if metrics is not None:
            metrics.observe_claim("ok", time.perf_counter() - started)
        return 200, _encode({"code": code}), []

    def _need_allocator(self) -> Any:
        if self.allocator is None:
            raise Unavailable("no allocator: the server runs with --noop")
        return self.allocator

    async def _list_batches(self, request: Request) -> tuple[int, bytes, list]:
        rows = await self._need_allocator().batches(client_id=request.access.client_id)
        if not request.query_flag("all"):
            rows = [row for row in rows if not row["expired"]]
        return 200, _encode(rows), []

    async def _get_batch(self, request: Request) -> tuple[int, bytes, list]:
        return 200, _encode(await self._visible_batch(request)), []

    async def _visible_batch(self, request: Request) -> dict[str, Any]:
        """The batch of the path if the token reaches it (a client token: its own only)."""
        wanted = str(_batch_id(request.params["id"]))
        for row in await self._need_allocator().batches(client_id=request.access.client_id):
            if row["id"] == wanted:
                return row
        raise BatchNotFound(f"no batch with id {wanted}")

    async def _expire_batch(self, request: Request) -> tuple[int, bytes, list]:
        batch_id = str(_batch_id(request.params["id"]))
        changed = await self._need_allocator().expire(batch_id,
                                                      client_id=request.access.client_id)
        return 200, _encode({"id": batch_id, "expired": True, "changed": changed}), []

    # --- the life of a batch and of a code (issue 14) --------------------------------

    @staticmethod
    def _batch_to_change(request: Request) -> str:
        """The batch id of a change; a client token gets what a missing batch gets.

        Changes are the operator's (the admin token's), as over the binary
        protocol; a client token learns nothing of which batches exist.
        """
        bid = str(_batch_id(request.params["id"]))
        if not request.access.admin:
            raise BatchNotFound(f"no batch with id {bid}")
        return bid

    @staticmethod
    def _need_admin(request: Request) -> None:
        if not request.access.admin:
            # Look-ups span every client's batches: 403, the binary protocol's code.
            raise HttpError(403, AuthenticationFailed.code, "look-ups need the admin token")

    async def _lookup(self, request: Request) -> tuple[int, bytes, list]:
        self._need_admin(request)
        return 200, _encode(await self._need_allocator().lookup(request.params["code"])), []

    async def _customer_codes(self, request: Request) -> tuple[int, bytes, list]:
        self._need_admin(request)
        limit = request.query("limit")
        if limit is not None and not (limit.isascii() and limit.isdigit()):
            raise InvalidInput(f"limit must be a whole number, got {limit[:40]!r}")
        rows = await self._need_allocator().customer_codes(
            request.params["customer_id"], request.query("batch_id") or None,
            1000 if limit is None else int(limit))
        return 200, _encode(rows), []

    async def _set_rules(self, request: Request) -> tuple[int, bytes, list]:
        batch_id = self._batch_to_change(request)
        body: RulesBody = await self._json_body(request, _rules_decoder)
        rules = await self._need_allocator().set_rules(batch_id, body.rules)
        return 200, _encode({"batch_id": batch_id, "rules": rules}), []

    async def _set_schedule(self, request: Request) -> tuple[int, bytes, list]:
        batch_id = self._batch_to_change(request)
        body: ScheduleBody = await self._json_body(request, _schedule_decoder)
        keep_start = body.starts_at is msgspec.UNSET
        keep_end = body.expires_at is msgspec.UNSET
        schedule = await self._need_allocator().set_schedule(
            batch_id, None if keep_start else body.starts_at,
            None if keep_end else body.expires_at, keep_start=keep_start, keep_end=keep_end)
        return 200, _encode(schedule), []

    async def _delete_batch(self, request: Request) -> tuple[int, bytes, list]:
        batch_id = self._batch_to_change(request)
        result = await self._need_allocator().delete(batch_id, request.query_flag("purge"))
        return 200, _encode(result), []

    async def _export(self, request: Request) -> tuple[int, Streamed, list]:
        alloc = self._need_allocator()
        what = request.query("what") or ""
        fmt = request.query("format") or "csv"
        if not request.access.admin:
            await self._visible_batch(request)  # a client token: its own batches only
        batch_id = str(_batch_id(request.params["id"]))
        if self._exports >= self.limits.max_exports:
            raise Unavailable(f"{self._exports} exports are running; retry later")
        self._exports += 1
        spout = Spout(asyncio.get_running_loop())
        done = False

        def end() -> None:
            nonlocal done
            if not done:
                done = True
                self._exports -= 1

        try:
            self._export_pool.submit(run_export, alloc.dsn, batch_id, what, fmt, spout)
            # The first chunk (or the export's error: unknown batch, bad what or
            # format) comes before the status is chosen.
            first = await spout.next()
        except BaseException:
            spout.stop()
            end()
            raise
        media = b"text/csv; charset=utf-8" if fmt == "csv" else b"application/x-ndjson"
        name = b'attachment; filename="%s-%s.%s"' % (batch_id.encode(), what.encode(),
                                                    fmt.encode())
        return 200, Streamed(first, spout, [(b"content-type", media),
                                            (b"content-disposition", name)], end), []

    async def _stats(self, request: Request) -> tuple[int, bytes, list]:
        if not request.access.admin:  # counters would tell one client of the others' traffic
            return 200, _encode({"protocol": self.health() if self.health else {}}), []
        stats: dict[str, Any] = {"http": self.stats()}
        if self.allocator is not None:
            stats["allocator"] = await self.allocator.stats()
        if self.extra_stats is not None:
            stats["protocol"] = self.extra_stats()
        return 200, _encode(stats), []

    async def _healthcheck(self, request: Request) -> tuple[int, bytes, list]:
        if await self.database_reachable():
            return 200, b'{"status":"healthy","message":"System is operational"}', []
        return 503, _encode({"status": "unhealthy", "error": "database_unreachable",
                             "message": "Unable to connect to the database"}), _RETRY_AFTER

    async def _readyz(self, request: Request) -> tuple[int, bytes, list]:
        database_ok, (shards, alive) = await asyncio.gather(self.database_reachable(),
                                                           self._shards.get())
        ready = database_ok and alive == shards
        body: dict[str, Any] = {"ready": ready, "database": database_ok,
                                "shards": shards, "shards_alive": alive}
        if ready:
            return 200, _encode(body), []
        why = "PostgreSQL cannot be reached" if not database_ok else \
            f"{shards - alive} of {shards} shards are not serving"
        return 503, _encode({"error": "not_ready", "message": why, **body}), _RETRY_AFTER

    async def _livez(self, request: Request) -> tuple[int, bytes, list]:
        return 200, b'{"status":"alive"}', []

    async def _metrics(self, request: Request) -> tuple[int, bytes, list]:
        if self.metrics is None:
            raise HttpError(404, "not_found", "metrics are not enabled on this server")
        body, content_type = self.metrics.exposition()
        return 200, body, [(b"content-type", content_type.encode())]

    async def _openapi(self, request: Request) -> tuple[int, bytes, list]:
        return 200, self._openapi, []

    async def _upload(self, request: Request) -> tuple[int, bytes | None, list]:
        alloc = self._need_allocator()
        result = await self._receive_upload(request, lambda boundary: Upload(
            alloc.dsn, boundary, run=self._in_upload_thread,
            only_client=request.access.client_id))
        if result is None:
            return 400, None, []  # the client went away
        log.info("HTTP upload: batch %s, %d codes", result.batch_id, result.imported)
        return 200, _encode({"message": "Codes uploaded successfully",
                             "batch_id": str(result.batch_id),
                             "imported": result.imported}), []

    async def _top_up(self, request: Request) -> tuple[int, bytes | None, list]:
        alloc = self._need_allocator()
        batch_id = self._batch_to_change(request)
        result = await self._receive_upload(request, lambda boundary: TopUp(
            alloc.dsn, boundary, batch_id, run=self._in_upload_thread))
        if result is None:
            return 400, None, []
        log.info("HTTP top-up: batch %s, %d codes added", batch_id, result.imported)
        return 200, _encode({"batch_id": batch_id, "imported": result.imported}), []

    async def _receive_upload(self, request: Request,
                              make: Callable[[bytes], Upload]) -> ImportResult | None:
        """Stream a multipart body into ``make(boundary)``; its import's result (None:
        the client went away). Uploads and top-ups share the limits."""
        media, options = parse_options_header(request.headers.get(b"content-type", b""))
        if media != b"multipart/form-data" or not options.get(b"boundary"):
            raise HttpError(415, "unsupported_media_type",
                            "the upload must be multipart/form-data with a boundary")
        limit = self.limits.max_upload_bytes
        length = request.headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise TooLarge(f"the upload is larger than {limit} bytes")
        if self._uploads >= self.limits.max_uploads:
            raise Unavailable(f"{self._uploads} uploads are being imported; retry later")
        self._uploads += 1
        upload = make(options[b"boundary"])
        try:
            size = 0
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    await upload.abort(ConnectionError("the client went away"))
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"the upload is larger than {limit} bytes")
                if chunk:
                    await upload.feed(chunk)
                if not message.get("more_body", False):
                    # Read to the end even after the importer has failed: a client
                    # still sending when the connection closes may never see the answer.
                    request.body_done = True
                    break
            result = await upload.finish()
        except BaseException as exc:
            await upload.abort(exc)
            raise
        finally:
            self._uploads -= 1
            upload.close()
        if self.metrics is not None:
            self.metrics.import_rows(result.imported)
        return result

    async def _in_upload_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(
            self._upload_pool, functools.partial(fn, *args))

    # --- probes and counters ----------------------------------------------------------

    async def database_reachable(self) -> bool:
        """True when PostgreSQL answers (probed at most once a second)."""
        if self.allocator is None:
            return True
        return await self._database.get()

    async def _check_database(self) -> bool:
        # On the allocator's database watch and its one connection: a probe opens none.
        return await self.allocator.database.check(self.limits.probe_timeout) is None

    async def _shards_alive(self) -> tuple[int, int]:
        if self.allocator is None:
            return 0, 0
        stats = await self.allocator.stats()
        return stats["shards"], sum(1 for s in stats["per_shard"] if s.get("alive", True))

    def stats(self) -> dict[str, Any]:
        """The HTTP API's own counters."""
        return {"requests": self.requests, "connections": self.connections,
                "uploads_in_progress": self._uploads, "exports_in_progress": self._exports,
                "responses": {str(k): v for k, v in sorted(self.responses.items())}}

    def close(self) -> None:
        """Release the upload threads (after the server has stopped)."""
        self._upload_pool.shutdown(wait=False, cancel_futures=True)
        self._export_pool.shutdown(wait=False, cancel_futures=True)


class Cached:
    """The answer of an async probe, reused for ``ttl`` seconds; callers share one probe."""

    def __init__(self, probe: Callable[[], Awaitable[Any]], ttl: float) -> None:
        self._probe = probe
        self._ttl = ttl
        self._at = -1e9
        self._value: Any = None
        self._running: asyncio.Task | None = None

    async def get(self) -> Any:
        """The cached answer, or a fresh one."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._at < self._ttl:
            return self._value
        if self._running is None:
            self._running = loop.create_task(self._refresh())
        return await asyncio.shield(self._running)

    async def _refresh(self) -> Any:
        try:
            self._value = await self._probe()
            self._at = asyncio.get_running_loop().time()
            return self._value
        finally:
            self._running = None



def _batch_id(text: str) -> Any:
    return parse_uuid(text, "batch id")


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == JSON or (media.startswith(b"application/") and media.endswith(b"+json"))
