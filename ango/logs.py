"""One log format for the server and its shard processes: text or JSON lines.

``ango serve --log-level/--log-format`` calls :func:`configure`, which also
puts both settings in the environment so the shard processes it starts log
the same way (:func:`configure_from_env`). Extra fields given with
``log.warning(..., extra={...})`` become keys of the JSON line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import IO, Any

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_ENV_LEVEL = "ANGO_LOG_LEVEL"
_ENV_FORMAT = "ANGO_LOG_FORMAT"

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """A JSON object per line: ts, level, logger, msg, the ``extra`` fields, exc."""

    def format(self, record: logging.LogRecord) -> str:  # noqa: D102
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: str = "info", fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Log Ango's records at ``level`` and above to ``stream`` (stderr) as ``fmt``.

    Other libraries log at warning and above. The settings are exported to the
    environment for the shard processes started afterwards.
    """
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    numeric = getattr(logging, level.upper())
    root.setLevel(max(numeric, logging.WARNING))
    logging.getLogger("ango").setLevel(numeric)
    os.environ[_ENV_LEVEL] = level
    os.environ[_ENV_FORMAT] = fmt


def configure_from_env(default_level: str = "warning") -> None:
    """As the parent process configured it (shard processes), else text at ``default_level``."""
    level = os.environ.get(_ENV_LEVEL, default_level)
    fmt = os.environ.get(_ENV_FORMAT, "text")
    configure(level if level in LEVELS else default_level, fmt if fmt in FORMATS else "text")


class RateLimit:
    """At most one log line per key every ``every`` seconds, with a count of the rest.

    ``hit(key)`` returns None while the key is quiet, else how many hits the
    line to write now stands for. Keys are forgotten after a quiet period, and
    at most ``max_keys`` are kept (a flood of addresses cannot grow it).
    """

    def __init__(self, every: float = 10.0, max_keys: int = 10_000) -> None:
        self.every = every
        self.max_keys = max_keys
        self._seen: dict[str, tuple[float, int]] = {}  # key: (last line, hits since)

    def hit(self, key: str, now: float | None = None) -> int | None:
        """Count a hit; return the count to report if a line is due now."""
        now = time.monotonic() if now is None else now
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.every:
            self._seen[key] = (last[0], last[1] + 1)
            return None
        if len(self._seen) >= self.max_keys:
            horizon = now - self.every
            self._seen = {k: v for k, v in self._seen.items() if v[0] > horizon}
            if len(self._seen) >= self.max_keys:
                self._seen.clear()
        self._seen[key] = (now, 0)
        return 1 + (last[1] if last is not None else 0)
