"""Claims per second through `ango serve`, with ``ango.AsyncClient`` pipelining.

    python -m benchmarks.protocol_load --noop [--concurrency 100] [--seconds 5]
    python -m benchmarks.protocol_load --port 7878 --token T --batch BATCH_ID

``--noop`` starts ``ango serve --noop`` itself (claims answered with a constant
code, no shards, no PostgreSQL: the transport's ceiling). Otherwise it claims
from BATCH_ID on a running server, one customer per claim. The client runs in
this process on uvloop with ``--concurrency`` claims in flight over
``--connections`` connections; it prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time

import uvloop

import ango


async def load(port: int, token: str, batch: str, concurrency: int, connections: int,
               seconds: float) -> dict:
    clients = [await ango.AsyncClient.connect(port=port, token=token, timeout=30)
               for _ in range(connections)]
    done = 0
    errors = 0
    stop_at = 0.0

    async def worker(w: int) -> None:
        nonlocal done, errors
        client = clients[w % connections]
        loop = asyncio.get_running_loop()
        i = 0
        while loop.time() < stop_at:
            try:
                await client.claim(batch, f"w{w}-{i}")
                done += 1
            except ango.AngoError:
                errors += 1
            i += 1

    loop = asyncio.get_running_loop()
    stop_at = loop.time() + 0.5  # warm up
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    done = errors = 0
    started = time.perf_counter()
    stop_at = loop.time() + seconds
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - started
    for client in clients:
        await client.close()
    return {"claims": done, "errors": errors, "seconds": round(elapsed, 3),
            "claims_per_s": round(done / elapsed), "concurrency": concurrency,
            "connections": connections}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noop", action="store_true", help="start `ango serve --noop` and load it")
    parser.add_argument("--port", type=int, default=7878)
    parser.add_argument("--token", default=os.environ.get("ANGO_TOKEN", "bench-token"))
    parser.add_argument("--batch", default="00000000-0000-4000-8000-000000000000")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    server = None
    port = args.port
    if args.noop:
        server = subprocess.Popen(
            [sys.executable, "-c", "from ango.cli import main; main()", "serve", "--noop",
             "--port", "0", "--token", args.token], stderr=subprocess.PIPE, text=True)
        for line in server.stderr:
            match = re.search(r"serving on [^:]+:(\d+)", line)
            if match:
                port = int(match.group(1))
                break
    try:
        result = uvloop.run(load(port, args.token, args.batch, args.concurrency, args.connections,
                                 args.seconds))
        result["mode"] = "noop" if args.noop else "allocator"
        print(json.dumps(result))
    finally:
        if server is not None:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
