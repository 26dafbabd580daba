"""ango.framing: the one frame reader and the one frame writer of every byte stream."""

from __future__ import annotations

import struct

import msgspec
import pytest

from ango.framing import FrameReader, FrameTooLarge, FrameWriter, encode_frame
from ango.protocol import MAX_FRAME, Code, Ping, request_decoder, response_decoder
from ango.shards import messages as m


def test_frame_reader_yields_complete_frames_and_keeps_a_partial_one():
    a, b, c = encode_frame(Ping(1)), encode_frame(Ping(2)), encode_frame(Ping(3))
    reader = FrameReader(MAX_FRAME)
    reader.feed(a + b[:5])
    assert [request_decoder.decode(f) for f in reader.frames()] == [Ping(1)]
    assert len(reader) == 5
    for piece in (b[5:6], b[6:] + c[:1], c[1:]):  # a frame trickling in, byte by byte
        reader.feed(piece)
    assert [request_decoder.decode(f) for f in reader.frames()] == [Ping(2), Ping(3)]
    assert len(reader) == 0


def test_frame_reader_stops_where_its_caller_stopped_and_resumes_there():
    reader = FrameReader(MAX_FRAME)
    reader.feed(b"".join(encode_frame(Ping(i)) for i in range(3)))
    for payload in reader.frames():
        assert request_decoder.decode(payload) == Ping(0)
        break  # e.g. paused: the rest waits
    assert [request_decoder.decode(f) for f in reader.frames()] == [Ping(1), Ping(2)]


def test_frame_reader_grows_a_large_frame_in_place_even_while_a_payload_is_held():
    big = encode_frame(m.Claims([m.Claim(i, "b", "c", None, "r") for i in range(5000)]))
    reader = FrameReader(len(big))
    reader.feed(encode_frame(Ping(1)) + big[:100])
    held = list(reader.frames())  # a caller keeping its payload views
    for start in range(100, len(big), 1000):
        reader.feed(big[start:start + 1000])
    (payload,) = reader.frames()
    assert len(msgspec.msgpack.Decoder(m.ToShard).decode(payload).claims) == 5000
    assert request_decoder.decode(held[0]) == Ping(1)


def test_frame_reader_refuses_a_header_over_the_limit_after_the_frames_before_it():
    reader = FrameReader(MAX_FRAME)
    reader.feed(encode_frame(Ping(1)) + struct.pack(">I", MAX_FRAME + 1))
    got = []
    with pytest.raises(FrameTooLarge, match=f"frame of {MAX_FRAME + 1} bytes exceeds the "
                                            f"maximum of {MAX_FRAME}") as raised:
        for payload in reader.frames():
            got.append(request_decoder.decode(payload))
    assert got == [Ping(1)]
    assert (raised.value.size, raised.value.max_frame) == (MAX_FRAME + 1, MAX_FRAME)


def test_frame_writer_writes_what_waits_in_one_piece_when_flushed():
    written: list[bytes] = []
    scheduled: list[int] = []
    writer = FrameWriter(lambda b: written.append(bytes(b)), lambda: scheduled.append(1),
                         max_frame=MAX_FRAME)
    writer.append(Code(1, "A"))
    writer.append(Code(2, "B"))
    assert scheduled == [1] and written == []  # one flush arranged for both
    writer.flush()
    assert written == [encode_frame(Code(1, "A")) + encode_frame(Code(2, "B"))]
    writer.flush()
    assert len(written) == 1 and len(writer) == 0


def test_frame_writer_without_a_schedule_writes_each_message_at_once():
    written: list[bytes] = []
    writer = FrameWriter(lambda b: written.append(bytes(b)), None, max_frame=MAX_FRAME)
    writer.append(Ping(1))
    writer.append(Ping(2))
    assert written == [encode_frame(Ping(1)), encode_frame(Ping(2))]


def test_frame_writer_stays_bounded_by_writing_before_its_flush():
    written: list[bytes] = []
    writer = FrameWriter(lambda b: written.append(bytes(b)), lambda: None,
                         max_frame=MAX_FRAME, limit=1000)
    frame = len(encode_frame(Code(199, "X" * 20)))
    for i in range(200):
        writer.append(Code(i, "X" * 20))
    assert written and all(len(piece) < 1000 + frame for piece in written)
    writer.flush()
    frames = FrameReader(MAX_FRAME)
    frames.feed(b"".join(written))
    assert [response_decoder.decode(f).id for f in frames.frames()] == list(range(200))


def test_frame_writer_refuses_a_message_over_the_limit_and_keeps_the_others():
    written: list[bytes] = []
    writer = FrameWriter(lambda b: written.append(bytes(b)), lambda: None, max_frame=100)
    writer.append(Code(1, "A"))
    with pytest.raises(FrameTooLarge, match="exceeds the maximum of 100"):
        writer.append(Code(2, "X" * 200))
    writer.flush()
    assert written == [encode_frame(Code(1, "A"))]
