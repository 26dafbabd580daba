"""SQL statements, loaded by name from ``queries.sql``.

Each statement sits under a ``-- name: <name>`` header; Python code uses
``queries["name"]`` and never assembles SQL from strings.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _load(text: str) -> dict[str, str]:
    parts = _HEADER.split(text)
    found: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [ln for ln in body.strip().splitlines() if not ln.startswith("--")]
        found[name] = "\n".join(lines).strip()
    return found


queries: dict[str, str] = _load(resources.files(__name__).joinpath("queries.sql").read_text())


def migrations() -> list[tuple[int, str, str]]:
    """The numbered migrations as ``(version, name, sql)``, in order."""
    folder = resources.files(__name__).joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        name = Path(entry.name)
        if name.suffix == ".sql":
            version = int(name.stem.split("_", 1)[0])
            found.append((version, name.stem, entry.read_text()))
    return sorted(found)
