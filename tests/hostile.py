"""Helpers for the hostile-input suites (fuzzing, bad input, security).

A module-scoped database (so one allocator serves a whole module), a
well-behaved client that keeps claiming in a thread and checks every answer,
row counts to show the database unchanged, and hypothesis strategies for every
message of ``ango.protocol``: valid structure, wrong types, huge values.
"""

from __future__ import annotations

import socket
import struct
import threading
import uuid
from collections.abc import Iterator

import msgspec
import psycopg
import pytest
from hypothesis import strategies as st

import ango
from ango.protocol import MAX_FRAME, PROTOCOL_VERSION, Claim, Expire, Hello
from tests.conftest import with_dbname
from tests.servers import TOKEN, recv

#: Tables a refused request must leave as they were.
COUNTED = ("ango.issues", "ango.slots", "ango.leases")


@pytest.fixture(scope="module")
def module_dsn(server_dsn: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database shared by one test module."""
    name = f"ango_m_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield with_dbname(server_dsn, name)
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def row_counts(dsn: str) -> dict[str, int]:
    """Rows in each table a claim or expiry writes."""
    with psycopg.connect(dsn) as conn:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in COUNTED}


def frame(payload: bytes) -> bytes:
    """``payload`` with its length prefix."""
    return struct.pack(">I", len(payload)) + payload


def raw(message: dict) -> bytes:
    """Any map as a frame, whatever its fields hold."""
    return frame(msgspec.msgpack.encode(message))


def drain(sock: socket.socket, timeout: float = 10.0) -> list:
    """Every response until the server closes the connection (after a half-close)."""
    sock.settimeout(timeout)
    out = []
    while True:
        try:
            out.append(recv(sock))
        except (ConnectionError, OSError):
            return out


class WellBehaved:
    """A client claiming in a loop on its own thread; every answer is checked as it comes.

    ``expect`` is the noop code, or None for a real allocator (then codes must
    be distinct, and :attr:`answers` maps request id to code for the caller to
    check against the database).
    """

    def __init__(self, port: int, batch: str, expect: str | None = None) -> None:
        self.port, self.batch, self.expect = port, batch, expect
        self.answers: dict[str, str] = {}
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WellBehaved:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        n = 0
        with ango.Client(port=self.port, token=TOKEN, timeout=30) as client:
            while not self._stop.is_set() or n < 3:
                n += 1
                rid = f"good-{n}"
                try:
                    code = client.claim(self.batch, f"good-{n % 50}", request_id=rid)
                except ango.BatchExhausted:
                    self._stop.wait(0.01)
                    continue
                except Exception as exc:  # noqa: BLE001 (the test reports it)
                    self.problems.append(f"{rid}: {exc!r}")
                    continue
                if self.expect is not None and code != self.expect:
                    self.problems.append(f"{rid}: got {code!r}")
                elif self.expect is None and code in self.answers.values():
                    self.problems.append(f"{rid}: {code} was already handed out")
                self.answers[rid] = code
                self._stop.wait(0.002)

    @property
    def served(self) -> int:
        """Claims answered so far."""
        return len(self.answers)


class SilentFlood:
    """Connections that never send ``hello``, re-opened as soon as the server closes them.

    ``sources`` are local addresses to connect from (any of 127.0.0.0/8 works on
    Linux), ``per_source`` connections from each, held open on a thread until
    the flood is stopped. :attr:`opened` counts every connection made.
    """

    def __init__(self, port: int, sources: list[str], per_source: int) -> None:
        self.port, self.sources, self.per_source = port, sources, per_source
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SilentFlood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _open(self, source: str) -> socket.socket | None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5,
                                            source_address=(source, 0))
        except OSError:
            return None
        self.opened += 1
        sock.setblocking(False)
        return sock

    def _run(self) -> None:
        import selectors

        sel = selectors.DefaultSelector()
        for source in self.sources:
            for _ in range(self.per_source):
                if (sock := self._open(source)) is not None:
                    sel.register(sock, selectors.EVENT_READ, source)
        while not self._stop.is_set():
            for key, _ in sel.select(timeout=0.02):
                sock = key.fileobj
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    continue  # the server says why it closes; the close follows
                sel.unregister(sock)
                sock.close()
                if (sock := self._open(key.data)) is not None:  # re-open it at once
                    sel.register(sock, selectors.EVENT_READ, key.data)
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        sel.close()


# --- strategies -------------------------------------------------------------------

ids = st.one_of(st.integers(0, 2**64 - 1), st.integers(-2**63, -1))
uuids = st.uuids().map(str)
short_text = st.text(max_size=40)
huge_text = st.integers(1000, MAX_FRAME - 200).map(lambda n: "x" * n)
any_text = st.one_of(short_text, uuids, huge_text,
                     st.text(alphabet=st.characters(max_codepoint=0x1f), max_size=8))
opt_text = st.one_of(st.none(), any_text)

#: Any MessagePack value, nested a little.
values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1),
              st.floats(allow_nan=True), st.text(max_size=30), st.binary(max_size=30)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10,
)

TAGS = ["hello", "claim", "batches", "expire", "stats", "ping", "welcome", "code",
        "batch_list", "expired", "stats_reply", "pong", "error", "nope", ""]
FIELDS = ["id", "version", "token", "client", "batch_id", "customer_id", "client_id",
          "request_id", "code", "message"]


def valid_requests(batch: st.SearchStrategy[str] = any_text) -> st.SearchStrategy:
    """Every request type with fields of the right types (values anything)."""
    return st.one_of(
        st.builds(Hello, ids, st.integers(-5, 5), any_text, any_text),
        st.builds(Claim, ids, batch, any_text, opt_text, opt_text),
        st.builds(lambda i: {"type": "batches", "id": i}, ids),
        st.builds(Expire, ids, any_text),
        st.builds(lambda i: {"type": "stats", "id": i}, ids),
        st.builds(lambda i: {"type": "ping", "id": i}, ids),
    )


#: Maps tagged like requests (or not) whose fields hold values of any type.
wrong_types = st.builds(
    lambda tag, fields, extra: {"type": tag, **fields, **extra},
    st.one_of(st.sampled_from(TAGS), values),
    st.dictionaries(st.sampled_from(FIELDS), values, max_size=6),
    st.dictionaries(st.text(max_size=10), values, max_size=2),
)


def as_frame(message) -> bytes:
    """A message struct or a dict as one frame."""
    if isinstance(message, dict):
        return raw(message)
    return frame(msgspec.msgpack.encode(message))


#: Bytes that are not valid frames: random, truncated headers, lying lengths.
garbage = st.one_of(
    st.binary(min_size=1, max_size=200),
    st.builds(lambda n, body: struct.pack(">I", n) + body,
              st.integers(0, 2**32 - 1), st.binary(max_size=100)),
    st.builds(lambda body: frame(body), st.binary(max_size=200)),
)


def good_hello() -> bytes:
    """The hello that authenticates."""
    return as_frame(Hello(0, PROTOCOL_VERSION, TOKEN))
