"""The shared secret a client presents in ``hello``.

``--token`` > ``ANGO_TOKEN`` > the file ``<data dir>/token`` (mode 0600), which
``ango serve`` creates with a random token when none is given, so that clients
on the same machine find it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from ango.config import data_dir

TOKEN_FILE = "token"


def token_path(data_dir_path: str | os.PathLike[str] | None = None) -> Path:
    """Where the token file is (or would be)."""
    return data_dir(data_dir_path) / TOKEN_FILE


def read_token(data_dir_path: str | os.PathLike[str] | None = None) -> str | None:
    """``ANGO_TOKEN``, else the token file's content, else None."""
    if os.environ.get("ANGO_TOKEN"):
        return os.environ["ANGO_TOKEN"]
    try:
        return token_path(data_dir_path).read_text().strip() or None
    except OSError:
        return None


def ensure_token(data_dir_path: str | os.PathLike[str] | None = None) -> tuple[str, Path]:
    """The token in the token file, generated (mode 0600) if there is none; and its path."""
    path = token_path(data_dir_path)
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing, path
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    try:
        os.link(tmp, path)  # fails if another process created it meanwhile: theirs wins
    except FileExistsError:
        token = path.read_text().strip()
    finally:
        os.unlink(tmp)
    return token, path
