"""Plain ASGI vs Starlette for the HTTP API's hot route, under uvicorn + httptools on uvloop.

    pip install starlette   # not a dependency of Ango: only this comparison needs it
    python -m benchmarks.http_frameworks [--seconds 5] [--rounds 2]

Each app answers ``POST /api/v1/code/redeem`` by parsing the JSON body and
returning a constant code, in a server process of its own; wrk (``-t1 -c100``)
drives it, the two apps alternating for ``--rounds`` rounds. Prints requests/s
and p99 per round. It decided server/http_api.py's choice of a plain ASGI app.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BODY = json.dumps({"batchid": "11111111-1111-4111-8111-111111111111",
                   "clientid": "c0ffee00-0000-4000-8000-000000000001", "customerid": "x"})
LUA = f"""wrk.method = "POST"
wrk.body = '{BODY}'
wrk.headers["Content-Type"] = "application/json"
"""


async def plain(scope, receive, send) -> None:
    """The redeem route as a bare ASGI callable."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    json.loads(body)
    out = b'{"code":"NOOP"}'
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", b"%d" % len(out))]})
    await send({"type": "http.response.body", "body": out})


def starlette_app():
    """The same route in Starlette."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def redeem(request):
        await request.json()
        return JSONResponse({"code": "NOOP"})

    return Starlette(routes=[Route("/api/v1/code/redeem", redeem, methods=["POST"])])


def serve(kind: str, port: int) -> None:
    """Run one app until killed (the child process)."""
    import uvicorn
    import uvloop

    app = plain if kind == "plain" else starlette_app()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, loop="none", http="httptools",
                            lifespan="off", log_config=None, access_log=False)
    uvloop.run(uvicorn.Server(config).serve())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(kind: str, seconds: int, script: Path) -> dict:
    """Requests/s and p99 of one app."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.http_frameworks",
                               "--serve", kind, "--port", str(port)])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        out = subprocess.run(["wrk", "-t1", "-c100", f"-d{seconds}s", "--latency", "-s",
                              str(script), f"http://127.0.0.1:{port}/api/v1/code/redeem"],
                             capture_output=True, text=True, check=True).stdout
    finally:
        server.terminate()
        server.wait()
    from benchmarks.load import parse_wrk

    found = parse_wrk(out)
    return {"app": kind, "requests_per_s": round(found["requests"] / found["window_s"]),
            "p99_ms": found["p99_ms"]}


def main(argv: list[str] | None = None) -> None:
    """Command-line entry."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", choices=("plain", "starlette"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port)
        return
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(LUA)
        script.flush()
        for _ in range(args.rounds):
            for kind in ("plain", "starlette"):
                print(json.dumps(measure(kind, args.seconds, Path(script.name))), flush=True)


if __name__ == "__main__":
    main()
