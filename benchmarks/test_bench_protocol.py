"""pytest-benchmark: frames of the wire protocol (ango.protocol), both directions.

    .venv/bin/python -m pytest benchmarks/test_bench_protocol.py --benchmark-enable

The client encodes a claim and decodes its code; the server decodes the claim
and encodes the code; pipelined frames are split out of one read.
"""

from __future__ import annotations

from ango.framing import FrameReader, FrameWriter, encode_frame
from ango.protocol import MAX_FRAME, Claim, Code, request_decoder, response_decoder

BATCH = "5f0c6e2a-3b7d-4c1e-9a8f-2d4b6c8e0a1f"
CLAIM = Claim(2, BATCH, "customer-000042", None, "0f3b2c7e9a1d4e5f8a6b7c8d9e0f1a2b")
CODE = Code(2, "LFXCTNCSBP0000AB")


def test_bench_encode_claim_frame(benchmark):
    written = []
    writer = FrameWriter(written.append, None, max_frame=MAX_FRAME)

    def encode():
        writer.append(CLAIM)
        return written.pop()

    assert len(benchmark(encode)) > 100


def test_bench_decode_claim_frame(benchmark):
    payload = memoryview(encode_frame(CLAIM))[4:]
    assert benchmark(request_decoder.decode, payload) == CLAIM


def test_bench_encode_code_frame(benchmark):
    assert benchmark(encode_frame, CODE).endswith(b"LFXCTNCSBP0000AB")


def test_bench_decode_code_frame(benchmark):
    payload = memoryview(encode_frame(CODE))[4:]
    assert benchmark(response_decoder.decode, payload) == CODE


def test_bench_split_and_decode_100_pipelined_claims(benchmark):
    stream = b"".join(encode_frame(Claim(i, BATCH, f"c{i}", None, f"r{i}")) for i in range(100))

    def read():
        reader = FrameReader(MAX_FRAME)
        reader.feed(stream)
        return [request_decoder.decode(f) for f in reader.frames()], len(reader)

    claims, left = benchmark(read)
    assert len(claims) == 100 and left == 0
