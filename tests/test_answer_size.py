"""No answer exceeds a frame (issue 9, item 3): ``batches`` is paged, the server never sends a
frame above its limit, and a client that meets a bad frame treats what was pending as lost.

Two kinds of server: an in-process ``ProtocolServer`` over a real allocator holding 320
batches (more than fit in one 64 KiB frame), and a scripted raw-socket server that
answers with an oversized or undecodable frame on purpose.
"""

from __future__ import annotations

import asyncio
import io
import socket
import struct
import threading
import uuid
from collections.abc import Callable, Iterator

import pytest

import ango
from ango.framing import FrameReader, encode_frame
from ango.importer import import_codes
from ango.protocol import (
    MAX_FRAME,
    BatchList,
    Claim,
    Code,
    Error,
    GetStats,
    Hello,
    ListBatches,
    Ping,
    Pong,
    Welcome,
    request_decoder,
    response_decoder,
)
from tests.hostile import module_dsn, raw  # noqa: F401 (module_dsn: a fixture)
from tests.servers import (
    CLIENT_ID,
    TOKEN,
    InProcessServer,
    connect,
    hello,
    recv,
    recv_exactly,
    send,
)

#: More batches than one frame holds (each listed batch takes ~350 bytes with its long name).
BATCHES = 320


@pytest.fixture(scope="module")
def many(module_dsn: str) -> Iterator[tuple[InProcessServer, set[str]]]:  # noqa: F811
    """A server over a real allocator and the ids of its 320 batches."""
    ids = set()
    for i in range(BATCHES):
        name = f"batch {i:03d} " + "n" * 190  # names may be 200 characters long
        result = import_codes(module_dsn, io.BytesIO(f"code\nP{i}-{uuid.uuid4().hex}\n".encode()),
                              CLIENT_ID, name, None)
        ids.add(str(result.batch_id))
    with InProcessServer(lambda: ango.Allocator(module_dsn, shards=1)) as srv:
        yield srv, ids


def test_three_hundred_batches_are_listed_whole_by_the_blocking_client(many):
    srv, ids = many
    with ango.Client(port=srv.port, token=TOKEN, timeout=30) as client:
        listed = client.batches()
        assert client.claim(sorted(ids)[0], "still-works")  # the connection is not wedged
    assert len(listed) == BATCHES and {b["id"] for b in listed} == ids


def test_three_hundred_batches_are_listed_whole_by_the_async_client(many):
    srv, ids = many

    async def go() -> list[dict]:
        async with await ango.AsyncClient.connect(port=srv.port, token=TOKEN, timeout=30) as c:
            return await c.batches()

    listed = asyncio.run(go())
    assert len(listed) == BATCHES and {b["id"] for b in listed} == ids


def test_pages_fit_in_a_frame_and_list_every_batch_once_oldest_first(many):
    srv, ids = many
    seen: list[str] = []
    sizes: list[int] = []
    cursor = None
    with connect(srv.port) as sock:
        assert type(hello(sock)) is Welcome
        for i in range(1, 100):
            send(sock, ListBatches(i, cursor, 1000))
            (size,) = struct.unpack(">I", recv_exactly(sock, 4))
            sizes.append(size)
            page = response_decoder.decode(recv_exactly(sock, size))
            assert type(page) is BatchList and page.id == i
            seen += [b.id for b in page.batches]
            cursor = page.next
            if cursor is None:
                break
    assert len(sizes) > 1 and max(sizes) <= MAX_FRAME
    assert len(seen) == len(set(seen)) == BATCHES and set(seen) == ids
    names = [int(b.split()[1]) for b in names_in_order(srv)]
    assert names == sorted(names)


def test_limit_bounds_a_page_and_the_cursor_continues_after_it(many):
    srv, ids = many
    with connect(srv.port) as sock:
        assert type(hello(sock)) is Welcome
        send(sock, ListBatches(1, None, 7))
        first = recv(sock)
        send(sock, ListBatches(2, first.next, 7))
        second = recv(sock)
    assert len(first.batches) == len(second.batches) == 7
    assert first.next == first.batches[-1].id
    assert {b.id for b in first.batches}.isdisjoint(b.id for b in second.batches)


def test_a_request_that_does_not_page_gets_invalid_input_not_an_oversized_frame(many):
    srv, _ = many
    with connect(srv.port) as sock:
        assert type(hello(sock)) is Welcome
        sock.sendall(raw({"type": "batches", "id": 5}))  # as a client before paging
        answer = recv(sock)
        send(sock, ListBatches(6, None, 2))  # the connection is still good
        page = recv(sock)
    assert answer == Error(5, "invalid_input", answer.message, False)
    assert "page" in answer.message
    assert type(page) is BatchList and len(page.batches) == 2


def test_an_unknown_cursor_is_invalid_input(many):
    srv, _ = many
    with connect(srv.port) as sock:
        assert type(hello(sock)) is Welcome
        send(sock, ListBatches(3, str(uuid.uuid4()), 10), ListBatches(4, None, 0))
        answers = {a.id: a for a in (recv(sock), recv(sock))}
    assert answers[3].code == "invalid_input" and "cursor" in answers[3].message
    assert answers[4].code == "invalid_input"  # a limit below 1


class HugeStats:
    """An allocator whose stats would not fit in a frame."""

    async def stats(self) -> dict:
        return {"blob": "x" * (MAX_FRAME + 10)}


def test_an_answer_too_big_for_a_frame_becomes_an_error_for_that_request():
    with InProcessServer(HugeStats()) as srv, connect(srv.port) as sock:
        assert type(hello(sock)) is Welcome
        send(sock, GetStats(8))
        (size,) = struct.unpack(">I", recv_exactly(sock, 4))
        answer = response_decoder.decode(recv_exactly(sock, size))
        send(sock, Ping(9))
        assert recv(sock) == Pong(9)
    assert size <= MAX_FRAME
    assert answer == Error(8, "error", "the answer does not fit in a frame", False)


# --- a hostile server ----------------------------------------------------------------------

OVERSIZED = struct.pack(">I", MAX_FRAME + 1) + b"x" * 64
GARBAGE = struct.pack(">I", 2) + b"\xc1\xc1"  # 0xc1 is never valid MessagePack


class ScriptedServer:
    """A raw-socket server speaking just enough of the protocol to serve the clients.

    ``bad(connection, message)`` returns bytes to send instead of the proper answer, or
    None. Claims are answered ``CODE-<request id>``; :attr:`claims` records
    ``(connection, request id)`` of every claim received.
    """

    def __init__(self, bad: Callable[[int, object], bytes | None]) -> None:
        self.bad = bad
        self.claims: list[tuple[int, str]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> ScriptedServer:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.listener.close()
        for thread in self._threads:
            thread.join(5)

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        n = 0
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            thread = threading.Thread(target=self._serve, args=(sock, n), daemon=True)
            thread.start()
            self._threads.append(thread)
            n += 1

    def _serve(self, sock: socket.socket, n: int) -> None:
        reader = FrameReader(MAX_FRAME)
        sock.settimeout(0.1)
        with sock:
            while not self._stop.is_set():
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                reader.feed(data)
                messages = [request_decoder.decode(f) for f in reader.frames()]
                out = bytearray()
                for msg in messages:
                    if type(msg) is Claim:
                        self.claims.append((n, msg.request_id))
                    out += self.bad(n, msg) or encode_frame(self._answer(msg))
                try:
                    sock.sendall(out)
                except OSError:
                    return

    @staticmethod
    def _answer(msg: object) -> object:
        if type(msg) is Hello:
            return Welcome(msg.id, 1, "scripted", MAX_FRAME, 1024, 300.0)
        if type(msg) is Claim:
            return Code(msg.id, f"CODE-{msg.request_id}")
        return BatchList(msg.id, [])


def first_claim_answered_with(junk: bytes) -> Callable[[int, object], bytes | None]:
    """On the first connection, the answer to the first claim is ``junk``."""
    def bad(n: int, msg: object) -> bytes | None:
        return junk if n == 0 and type(msg) is Claim else None
    return bad


@pytest.mark.parametrize("junk", [OVERSIZED, GARBAGE], ids=["oversized", "garbage"])
def test_the_blocking_client_retries_a_claim_lost_to_a_bad_frame_and_recovers(junk):
    with ScriptedServer(first_claim_answered_with(junk)) as srv:
        with ango.Client(port=srv.port, token=TOKEN, timeout=10) as client:
            code = client.claim(str(uuid.uuid4()), "ann", request_id="r-1")
            later = client.claim(str(uuid.uuid4()), "bob", request_id="r-2")
    assert code == "CODE-r-1" and later == "CODE-r-2"
    assert srv.claims == [(0, "r-1"), (1, "r-1"), (1, "r-2")]  # the same request id, resent


@pytest.mark.parametrize("junk", [OVERSIZED, GARBAGE], ids=["oversized", "garbage"])
def test_the_async_client_retries_every_claim_in_flight_lost_to_a_bad_frame(junk):
    with ScriptedServer(first_claim_answered_with(junk)) as srv:
        async def go() -> list[str]:
            async with await ango.AsyncClient.connect(port=srv.port, token=TOKEN,
                                                      timeout=10) as c:
                return await asyncio.gather(*(c.claim(str(uuid.uuid4()), f"c{i}",
                                                      request_id=f"r-{i}") for i in range(5)))

        codes = asyncio.run(go())
    assert codes == [f"CODE-r-{i}" for i in range(5)]
    resent = [rid for n, rid in srv.claims if n == 1]
    assert sorted(resent) == [f"r-{i}" for i in range(5)]


@pytest.mark.parametrize("junk", [OVERSIZED, GARBAGE], ids=["oversized", "garbage"])
def test_a_server_that_always_sends_bad_frames_is_reported_as_unavailable(junk):
    """Never the definitive ProtocolError: the claims may have been issued."""
    with ScriptedServer(lambda n, msg: junk if type(msg) is Claim else None) as srv:
        with ango.Client(port=srv.port, token=TOKEN, timeout=1) as client:
            with pytest.raises(ango.Unavailable) as caught:
                client.claim(str(uuid.uuid4()), "ann", request_id="r-sync")
        assert caught.value.retryable and caught.value.request_id == "r-sync"

        async def go() -> None:
            async with await ango.AsyncClient.connect(port=srv.port, token=TOKEN,
                                                      timeout=1) as c:
                await c.claim(str(uuid.uuid4()), "ann", request_id="r-async")

        with pytest.raises(ango.Unavailable) as caught:
            asyncio.run(go())
        assert caught.value.request_id == "r-async"


def names_in_order(srv: InProcessServer) -> list[str]:
    with ango.Client(port=srv.port, token=TOKEN, timeout=30) as client:
        return [b["name"] for b in client.batches()]
