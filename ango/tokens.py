"""Tokens: the admin token of ``ango serve``, client-scoped tokens, and checking them.

The admin token: ``ANGO_TOKEN`` > the file ``--token-file``/``ANGO_TOKEN_FILE``
(e.g. a Kubernetes Secret mount) > the file ``<data dir>/token`` (mode 0600),
which ``ango serve`` creates with a random token when none is given, so that
clients on the same machine find it. It reaches every batch. ``--token`` works
too but warns: other local users can read a command line. A token file other
users can read, or anyone but its owner and group can write, is made private
(with a warning) or refused.

Client tokens (``ango token create --client ID``) reach one client's batches;
they are stored hashed in PostgreSQL. :class:`Authenticator` checks both kinds
for every protocol.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg

from ango.background import stop_task
from ango.config import data_dir, read_secret
from ango.errors import BatchNotFound, InvalidInput
from ango.importer import parse_uuid
from ango.sql import queries

log = logging.getLogger("ango.tokens")

TOKEN_FILE = "token"


def token_path(data_dir_path: str | os.PathLike[str] | None = None) -> Path:
    """Where the token file is (or would be)."""
    return data_dir(data_dir_path) / TOKEN_FILE


def read_token(data_dir_path: str | os.PathLike[str] | None = None,
               token_file: str | os.PathLike[str] | None = None) -> str | None:
    """``ANGO_TOKEN``, else ``token_file`` or ``ANGO_TOKEN_FILE`` (which must exist),
    else ``<data dir>/token`` if there is one, else None."""
    if os.environ.get("ANGO_TOKEN"):
        return os.environ["ANGO_TOKEN"]
    explicit = token_file or os.environ.get("ANGO_TOKEN_FILE")
    if explicit:
        return read_secret(explicit, "token file") or None
    path = token_path(data_dir_path)
    if not path.exists():
        return None
    return read_secret(path, "token file") or None


def ensure_token(data_dir_path: str | os.PathLike[str] | None = None) -> tuple[str, Path]:
    """The token in the token file, generated (mode 0600) if there is none; and its path."""
    path = token_path(data_dir_path)
    existing = read_secret(path, "token file") if path.exists() else ""
    if existing:
        return existing, path
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    try:
        os.link(tmp, path)  # fails if another process created it meanwhile: theirs wins
    except FileExistsError:
        token = path.read_text().strip()
    finally:
        os.unlink(tmp)
    return token, path


# --- client-scoped tokens ----------------------------------------------------------
#
# A client token is shown once, when created; PostgreSQL keeps only its SHA-256.
# A slow password hash (bcrypt, argon2) protects low-entropy secrets people
# choose; these are 256 random bits, so SHA-256 can neither be reversed nor
# the token guessed, and a lookup stays one dict or index hit per handshake.

#: Client tokens start with this, so that secret scanners and people can tell them.
TOKEN_PREFIX = "ango_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def hash_token(token: str) -> bytes:
    """The SHA-256 a client token is stored and looked up as."""
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class TokenInfo:
    """A client token as listed (never the token or its hash)."""

    name: str
    client_id: str
    created_at: str
    revoked_at: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, as `ango token list --json` prints them."""
        return asdict(self)


def create_token(conn: psycopg.Connection, client_id: str,
                 name: str | None = None) -> tuple[str, TokenInfo]:
    """Make a token for one client; return it (shown only now) and its listing."""
    client = str(parse_uuid(client_id, "client id"))
    if name is None:
        name = f"{client[:8]}-{secrets.token_hex(4)}"
    if not _NAME.fullmatch(name):
        raise InvalidInput(f"token name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    try:
        with conn.transaction():
            (created,) = conn.execute(queries["insert_token"],
                                      (name, client, hash_token(token))).fetchone()
    except psycopg.errors.UniqueViolation:
        raise InvalidInput(f"a live token named {name!r} exists; revoke it or pick another "
                           "name") from None
    return token, TokenInfo(name, client, created.isoformat(), None)


def list_tokens(conn: psycopg.Connection) -> list[TokenInfo]:
    """Every client token, live and revoked, oldest first."""
    return [TokenInfo(name, str(client), created.isoformat(),
                      revoked.isoformat() if revoked else None)
            for name, client, created, revoked in conn.execute(queries["list_tokens"])]


def revoke_token(conn: psycopg.Connection, name: str) -> None:
    """Revoke the live token ``name``; open connections using it are closed within seconds."""
    with conn.transaction():
        if conn.execute(queries["revoke_token"], (name,)).fetchone() is None:
            raise InvalidInput(f"no live token named {name!r}")


@dataclass(frozen=True)
class Scope:
    """What a token may touch: every client's batches (admin) or one client's."""

    #: ``"admin"`` for the server's own token, else the client token's name.
    name: str
    #: The one client whose batches this token reaches; None for the admin token.
    client_id: str | None = None
    #: The client token's row id (None for the admin token), to notice revocation.
    token_id: int | None = None

    @property
    def admin(self) -> bool:
        """True for the admin token, which reaches every client's batches."""
        return self.client_id is None

    def claim_client(self, batch_id: object, client_id: object) -> object:
        """The client id a claim goes to the allocator with under this scope.

        The admin token's claims keep ``client_id``. A client token's claims get
        its own client (the shard then answers a batch of another client as one
        that does not exist); naming another client raises ``BatchNotFound``
        worded as the shard words it, so the answer tells nothing either way.
        """
        own = self.client_id
        if own is None:
            return client_id
        if client_id is None or client_id == own or str(parse_uuid(client_id, "client id")) == own:
            return own
        raise BatchNotFound(f"no batch {parse_uuid(batch_id, 'batch id')} for this client")


ADMIN = Scope("admin")


class Authenticator:
    """Checks tokens for every protocol (binary and HTTP): one call, one answer.

    The admin token (``ango serve``'s own, compared in constant time) reaches
    everything; client tokens live hashed in PostgreSQL and are reloaded every
    ``refresh_every`` seconds, so a revoked token stops working, also on open
    connections (see :meth:`is_live`), within about that time. An unknown token
    reloads at most every ``min_reload`` seconds, so guessing never loads the
    database. Without a DSN only the admin token exists.

        auth = Authenticator(admin_token, dsn)
        await auth.start()
        scope = await auth.authenticate(bearer_token)  # None: refuse
    """

    def __init__(self, admin_token: str, dsn: str | None = None, *, refresh_every: float = 1.0,
                 min_reload: float = 0.5) -> None:
        if not admin_token:
            raise ValueError("an admin token is required")
        self._admin = admin_token.encode()
        self.dsn = dsn
        self.refresh_every = refresh_every
        self.min_reload = min_reload
        self._by_hash: dict[bytes, Scope] = {}
        self._live_ids: frozenset[int] = frozenset()
        self._load_started = float("-inf")
        self._reloading: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection | None = None  # kept open between reloads
        self._warned = False

    async def start(self) -> None:
        """Load the client tokens and keep reloading them (no-op without a DSN)."""
        if self.dsn is None:
            return
        await self._reload()
        self._task = asyncio.create_task(self._refresh())

    async def close(self) -> None:
        """Stop reloading."""
        await stop_task(self._task)
        self._task = None
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    def lookup(self, token: str | None) -> Scope | None:
        """The scope of ``token`` from what is loaded now (no database round trip)."""
        if not token:
            return None
        encoded = token.encode()
        if hmac.compare_digest(encoded, self._admin):
            return ADMIN
        # A dict lookup by hash: what an attacker controls is the hash's preimage,
        # so the lookup's timing tells nothing about any stored token.
        return self._by_hash.get(hashlib.sha256(encoded).digest())

    async def authenticate(self, token: str | None) -> Scope | None:
        """The scope of ``token``, or None to refuse it (a token made a moment ago counts)."""
        scope = self.lookup(token)
        if scope is not None or not token or self.dsn is None:
            return scope
        loop = asyncio.get_running_loop()
        asked = loop.time()
        while self._load_started < asked:  # wait for a reload begun after the question
            wait = self._load_started + self.min_reload - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            else:
                await self._reload()
        return self.lookup(token)

    def is_live(self, scope: Scope) -> bool:
        """False once ``scope``'s token has been revoked (the admin token always is live)."""
        return scope.token_id is None or scope.token_id in self._live_ids

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_every)
            await self._reload()

    async def _reload(self) -> None:
        """Reload the live tokens; concurrent callers share one round trip."""
        if self._reloading is None:
            self._reloading = asyncio.ensure_future(self._load())
            self._reloading.add_done_callback(self._reloaded)
        await asyncio.shield(self._reloading)

    def _reloaded(self, _: asyncio.Future[None]) -> None:
        self._reloading = None

    @staticmethod
    async def _fetch_live(conn: psycopg.AsyncConnection) -> list[tuple]:
        return await (await conn.execute(queries["live_tokens"])).fetchall()

    async def _load(self) -> None:
        self._load_started = asyncio.get_running_loop().time()
        try:
            if self._conn is None or self._conn.closed:
                self._conn = await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, connect_timeout=5)
            # Bounded: handshakes with a token not known yet wait for this.
            rows = await asyncio.wait_for(self._fetch_live(self._conn), 5.0)
        except (psycopg.Error, TimeoutError) as exc:
            if self._conn is not None:
                await self._conn.close()  # reconnect next time
                self._conn = None
            # Keep the last tokens known: the admin token still works, and a
            # revocation is seen once the database answers again.
            if not self._warned:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "timed out"
                log.warning("cannot reload client tokens: %s", reason)
                self._warned = True
            return
        self._warned = False
        self._by_hash = {bytes(h): Scope(name, str(client), token_id)
                         for token_id, h, name, client in rows}
        self._live_ids = frozenset(s.token_id for s in self._by_hash.values())
