"""The `ango` command: thin shells over library functions."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from ango import batches as batches_lib
from ango import database
from ango.errors import (
    AngoError,
    AuthenticationFailed,
    BatchNotFound,
    ConfigurationError,
    DatabaseMissing,
    DatabaseRefused,
)
from ango.logs import FORMATS, LEVELS

#: Exit statuses a script can tell apart (README "Exit status"); click itself exits 2
#: for a usage error, and `ango audit` 1 when an invariant is broken.
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_REFUSED = 4
EXIT_UNAVAILABLE = 5
EXIT_CONFIGURATION = 6


def _secret_on_command_line(ctx: click.Context, param: click.Parameter,
                            value: str | None) -> str | None:
    """Warn when a secret is given on the command line, which every local user can read
    (``/proc/<pid>/cmdline``, ``ps``)."""
    from click.core import ParameterSource

    if not value or ctx.get_parameter_source(param.name) is not ParameterSource.COMMANDLINE:
        return value
    if param.name == "dsn":
        from psycopg.conninfo import conninfo_to_dict

        try:
            if not conninfo_to_dict(value).get("password"):
                return value
        except Exception:  # noqa: BLE001 (a malformed DSN is reported where it is used)
            return value
    instead = ("ANGO_DSN or ANGO_DSN_FILE" if param.name == "dsn"
               else "ANGO_TOKEN or ANGO_TOKEN_FILE")
    warning = (f"--{param.name} on the command line can be read by every user of this "
               f"machine; use {instead}")
    if ctx.info_name == "serve":  # logged once its logging is set up, in its format
        ctx.meta.setdefault("ango_warnings", []).append(warning)
    else:
        click.echo(f"warning: {warning}", err=True)
    return value


_dsn_option = click.option(
    "--dsn", envvar=None, default=None, callback=_secret_on_command_line,
    help="PostgreSQL DSN (else ANGO_DSN, DATABASE_URL, the file ANGO_DSN_FILE, else the "
         "embedded server). A password here warns: use the environment or a file.",
)
_data_dir_option = click.option(
    "--data-dir", default=None, type=click.Path(file_okay=False),
    help="Data directory for the embedded server and token (else ANGO_DATA_DIR).",
)


class Failure(click.ClickException):
    """An AngoError as one line on stderr and the exit status for its kind."""

    def __init__(self, exc: AngoError, prefix: str = "", suffix: str = "") -> None:
        super().__init__(prefix + " ".join(str(exc).split()) + suffix)
        self.exit_code = exit_status(exc)


def exit_status(exc: AngoError) -> int:
    """The exit status of a command that failed with ``exc``."""
    if isinstance(exc, (DatabaseRefused, AuthenticationFailed)):
        return EXIT_REFUSED
    if isinstance(exc, (DatabaseMissing, BatchNotFound)):
        return EXIT_NOT_FOUND
    if isinstance(exc, ConfigurationError):
        return EXIT_CONFIGURATION
    if exc.retryable:
        return EXIT_UNAVAILABLE
    return EXIT_FAILED


class _Group(click.Group):
    """A group whose commands report any AngoError as one line and its exit status."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AngoError as exc:
            raise Failure(exc) from None


@contextlib.contextmanager
def _progress(length: int, label: str, quiet: bool,
              unit: str = "rows") -> Iterator[Callable[[int], None] | None]:
    """A callback taking the amount done so far, drawing a bar with the amount,
    the rate and the ETA on standard error; None under --json or when standard
    error is not a terminal (nothing is drawn)."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    started = time.monotonic()

    def describe(done: int | None) -> str:
        if done is None:
            return ""
        rate = done / max(time.monotonic() - started, 1e-3)
        if unit == "bytes":
            return f"{done / 1e6:,.1f} MB, {rate / 1e6:,.1f} MB/s"
        return f"{done:,} {unit}, {rate:,.0f} {unit}/s"

    seen = [0]
    with click.progressbar(length=max(length, 1), label=label, file=sys.stderr, show_eta=True,
                           item_show_func=describe) as bar:
        def update(done: int) -> None:
            bar.update(done - seen[0], done)
            seen[0] = done

        yield update


def _on_db(dsn: str | None, data_dir: str | None, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(conn, *args)`` on the resolved database (an AngoError reaches _Group)."""
    found = database.ready_dsn(dsn, data_dir)
    with database.connect(found, autocommit=True) as conn:
        return fn(conn, *args)


@click.group(cls=_Group)
@click.version_option(package_name="ango")
def main() -> None:
    """Ango hands out unique codes to customers, each exactly once."""


@main.command()
@_dsn_option
@_data_dir_option
@click.option("--partitions", default=16, show_default=True, type=click.IntRange(1, 1024),
              help="Code partitions; used only when the database is first created.")
def migrate(dsn: str | None, data_dir: str | None, partitions: int) -> None:
    """Create or upgrade the schema."""
    from ango.config import resolve_dsn

    applied = database.migrate(resolve_dsn(dsn, data_dir), partitions)
    click.echo(f"applied: {', '.join(applied)}" if applied else "schema is up to date")


@main.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--client", "client_id", default=None,
              help="Client id (UUID) owning the batch (required for a new batch).")
@click.option("--batch", "batch_name", default=None, help="Name of the new batch.")
@click.option("--into", "into", default=None,
              help="Add the codes to this existing batch (UUID) instead of creating one.")
@click.option("--rules", default=None,
              help='Rules JSON, e.g. {"maxpercustomer": 2, "timelimit": 30}.')
@click.option("--starts-at", default=None,
              help="Hand out codes from this time on (ISO 8601 with a zone, e.g. "
                   "2026-12-01T09:00:00Z).")
@click.option("--expires-at", default=None,
              help="Hand out no code from this time on (ISO 8601 with a zone).")
@click.option("--header/--no-header", default=None,
              help="Line 1 is a header / is a code (default: a header if it names 'code'; "
                   "refused if it only looks like one).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_dsn_option
@_data_dir_option
def import_cmd(file: Path, client_id: str | None, batch_name: str | None, into: str | None,
               rules: str | None, starts_at: str | None, expires_at: str | None,
               header: bool | None, as_json: bool, dsn: str | None, data_dir: str | None) -> None:
    """Create a batch from FILE (CSV with client_id,code, or one code per line),
    or add FILE's codes to an existing batch with --into."""
    from ango.importer import import_codes, top_up

    if into is not None:
        if any(v is not None for v in (batch_name, rules, starts_at, expires_at)):
            raise click.UsageError("--into adds to an existing batch: no --batch, --rules, "
                                   "--starts-at or --expires-at (see ango rules, ango schedule)")
    elif client_id is None or batch_name is None:
        raise click.UsageError("a new batch needs --client and --batch (or use --into BATCH_ID)")
    found = database.ready_dsn(dsn, data_dir)

    def waiting() -> None:
        click.echo("another import is running; waiting for it to finish", err=True)

    with _progress(os.path.getsize(file), "importing", as_json, "bytes") as progress:
        if into is not None:
            result = top_up(found, file, into, client_id, progress=progress, header=header,
                            on_wait=waiting)
        else:
            result = import_codes(found, file, client_id, batch_name, rules,
                                  progress=progress, header=header, on_wait=waiting,
                                  starts_at=starts_at, expires_at=expires_at)
    if as_json:
        click.echo(json.dumps({"batch_id": str(result.batch_id), "imported": result.imported}))
    else:
        click.echo(str(result.batch_id))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_dsn_option
@_data_dir_option
def batches(as_json: bool, dsn: str | None, data_dir: str | None) -> None:
    """List batches with their counts."""
    rows = _on_db(dsn, data_dir, batches_lib.list_batches)
    if as_json:
        click.echo(json.dumps([b.to_dict() for b in rows]))
        return
    header = (f"{'id':36}  {'name':20}  {'client':36}  {'expired':7}  {'total':>9}  "
              f"{'issued':>9}  {'available':>9}  rules")
    click.echo(header)
    for b in rows:
        click.echo(
            f"{b.id:36}  {b.name[:20]:20}  {b.client_id:36}  {str(b.expired).lower():7}  "
            f"{b.total:>9}  {b.issued:>9}  {b.available:>9}  {json.dumps(b.rules)}"
        )


@main.command()
@click.argument("batch_id")
@_dsn_option
@_data_dir_option
def expire(batch_id: str, dsn: str | None, data_dir: str | None) -> None:
    """Expire BATCH_ID: once this returns, no claim of it succeeds."""
    changed = _on_db(dsn, data_dir, batches_lib.expire_batch, batch_id)
    click.echo(f"expired {batch_id}" if changed else f"{batch_id} was already expired")


@main.group()
def token() -> None:
    """Client tokens: each reaches one client's batches only (the admin token reaches all)."""


@token.command("create")
@click.option("--client", "client_id", required=True, help="Client id (UUID) the token reaches.")
@click.option("--name", default=None, help="A name to list and revoke it by (default: generated).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the token included).")
@_dsn_option
@_data_dir_option
def token_create(client_id: str, name: str | None, as_json: bool, dsn: str | None,
                 data_dir: str | None) -> None:
    """Make a token for one client and print it: it is shown only this once."""
    from ango.tokens import create_token

    secret, info = _on_db(dsn, data_dir, create_token, client_id, name)
    if as_json:
        click.echo(json.dumps({"token": secret, **info.to_dict()}))
        return
    click.echo(f"token {info.name} for client {info.client_id} (shown only now; stored hashed):",
               err=True)
    click.echo(secret)


@token.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_dsn_option
@_data_dir_option
def token_list(as_json: bool, dsn: str | None, data_dir: str | None) -> None:
    """List client tokens, live and revoked (never the tokens themselves)."""
    from ango.tokens import list_tokens

    rows = _on_db(dsn, data_dir, list_tokens)
    if as_json:
        click.echo(json.dumps([t.to_dict() for t in rows]))
        return
    click.echo(f"{'name':24}  {'client':36}  {'created':32}  revoked")
    for t in rows:
        click.echo(f"{t.name:24}  {t.client_id:36}  {t.created_at:32}  {t.revoked_at or '-'}")


@token.command("revoke")
@click.argument("name")
@_dsn_option
@_data_dir_option
def token_revoke(name: str, dsn: str | None, data_dir: str | None) -> None:
    """Revoke token NAME: refused from now on, and open connections using it are
    closed within seconds."""
    from ango.tokens import revoke_token

    _on_db(dsn, data_dir, revoke_token, name)
    click.echo(f"revoked {name}")


def _instance_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", value):
        raise click.BadParameter(f"must be 1-63 letters, digits, '.', '_' or '-' starting with a "
                                 f"letter or digit, got {value[:80]!r}")
    return value


def _advertise(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    from ango.cluster.forwarding import split_address

    try:
        split_address(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


@main.command()
@_dsn_option
@_data_dir_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=7878, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port, logged when ready).")
@click.option("--shards", default=None, type=click.IntRange(1, 256),
              help="Shard processes (default: one per CPU the container's quota allows, "
                   "else per core).")
@click.option("--token", envvar="ANGO_TOKEN", default=None, callback=_secret_on_command_line,
              help="Admin token clients must present: better ANGO_TOKEN or --token-file (a "
                   "command line is readable by every local user).")
@click.option("--token-file", envvar="ANGO_TOKEN_FILE", default=None,
              type=click.Path(dir_okay=False),
              help="File holding the admin token, e.g. a Kubernetes Secret mount (else "
                   "ANGO_TOKEN_FILE, else <data dir>/token, generated with mode 0600).")
@click.option("--noop", is_flag=True,
              help="Answer every claim with a constant code, without shards or database "
                   "(measures the transport).")
@click.option("--db-wait", default=25.0, show_default=True, type=click.FloatRange(0),
              help="Seconds to wait for PostgreSQL at start-up, trying every SECONDS/5 "
                   "(at most 5 s; 0: try once).")
@click.option("--log-level", envvar="ANGO_LOG_LEVEL", default="info", show_default=True,
              type=click.Choice(LEVELS), help="Least severe log records written (stderr).")
@click.option("--log-format", envvar="ANGO_LOG_FORMAT", default="text", show_default=True,
              type=click.Choice(FORMATS), help="text, or json: one JSON object per line.")
@click.option("--tls-cert", envvar="ANGO_TLS_CERT", default=None,
              type=click.Path(exists=True, dir_okay=False),
              help="PEM certificate (chain): the port speaks TLS (else ANGO_TLS_CERT).")
@click.option("--tls-key", envvar="ANGO_TLS_KEY", default=None,
              type=click.Path(exists=True, dir_okay=False),
              help="PEM private key of --tls-cert (else ANGO_TLS_KEY; default: in the cert file).")
@click.option("--tls-required/--tls-optional", default=True, show_default=True,
              help="With a certificate: refuse plain-text clients, or accept both.")
@click.option("--http-host", default="127.0.0.1", show_default=True,
              help="Address the HTTP API listens on.")
@click.option("--http-port", default=None, type=click.IntRange(0, 65535),
              help="Port of the HTTP API (default: --port + 1, i.e. 7879; any free port "
                   "when --port is 0).")
@click.option("--no-http", is_flag=True, help="Serve the binary protocol only.")
@click.option("--http-no-auth", is_flag=True,
              help="The original's behaviour: HTTP requests need no token. Only on a "
                   "trusted network; warned about in the log.")
@click.option("--instance-name", envvar="ANGO_INSTANCE_NAME", default=None,
              callback=_instance_name,
              help="This instance's name in the cluster of instances on one database, e.g. "
                   "a StatefulSet pod's (else ANGO_INSTANCE_NAME; default: host name and a "
                   "random suffix).")
@click.option("--advertise", envvar="ANGO_ADVERTISE", default=None, callback=_advertise,
              help="HOST:PORT other instances and cluster-aware clients reach this one at "
                   "(else ANGO_ADVERTISE; default: the address listened on).")
def serve(dsn: str | None, data_dir: str | None, host: str, port: int, shards: int | None,
          token: str | None, token_file: str | None, noop: bool, db_wait: float,
          log_level: str, log_format: str, tls_cert: str | None, tls_key: str | None,
          tls_required: bool, http_host: str, http_port: int | None, no_http: bool,
          http_no_auth: bool, instance_name: str | None, advertise: str | None) -> None:
    """Serve claims over TCP (docs/PROTOCOL.md) and HTTP until SIGTERM or SIGINT."""
    import logging

    from ango.logs import configure
    from ango.server import log_startup
    from ango.server import serve as run_server
    from ango.tokens import ensure_token, read_token

    configure(log_level, log_format)
    for warning in click.get_current_context().meta.pop("ango_warnings", []):
        logging.getLogger("ango.cli").warning(warning)
    if token:
        token_source = "token from --token/ANGO_TOKEN"
    elif token_file:
        token, token_source = read_token(token_file=token_file), f"token in {token_file}"
        if not token:
            raise click.ClickException(f"the token file {token_file} is empty")
    else:
        token, path = ensure_token(data_dir)
        token_source = f"token in {path}"

    if tls_key and not tls_cert:
        raise click.UsageError("--tls-key needs --tls-cert")
    tls_mode = ("TLS only" if tls_required else "TLS or plain text") if tls_cert else "plain text"
    if not noop:
        dsn = database.wait_until_ready(dsn, data_dir, seconds=db_wait,
                                        report=logging.getLogger("ango.database").warning)
    try:
        if no_http:
            http_port = None
        elif http_port is None:
            http_port = port + 1 if 0 < port < 65535 else 0
        run_server(dsn=dsn, data_dir=data_dir, token=token, host=host, port=port, shards=shards,
                   noop=noop, tls_cert=tls_cert, tls_key=tls_key, tls_required=tls_required,
                   http_host=http_host, http_port=http_port, http_no_auth=http_no_auth,
                   instance_name=instance_name, advertise=advertise,
                   on_ready=lambda *where: log_startup(*where, note=f"{tls_mode}, {token_source}"))
    except OSError as exc:
        reason = exc.strerror or exc
        where = f"{host}:{port}" + (f" and {http_host}:{http_port}" if http_port else "")
        raise click.ClickException(f"cannot serve on {where}: {reason}") from None


def _server_options(command):
    """--host, --port, --token, --timeout, --tls, --tls-ca, --data-dir: how to reach a
    running `ango serve`."""
    for option in reversed((
        click.option("--host", default="127.0.0.1", show_default=True, help="Server address."),
        click.option("--port", default=7878, show_default=True, type=click.IntRange(1, 65535),
                     help="Server port."),
        click.option("--token", envvar="ANGO_TOKEN", default=None,
                     callback=_secret_on_command_line,
                     help="Server token: better ANGO_TOKEN or ANGO_TOKEN_FILE "
                          "(else <data dir>/token)."),
        click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(0.1),
                     help="Seconds to keep trying, retries included."),
        click.option("--tls", is_flag=True, help="Speak TLS, verifying the server (system CAs)."),
        click.option("--tls-ca", default=None, type=click.Path(exists=True, dir_okay=False),
                     help="Speak TLS, trusting the CA certificates in this PEM file."),
        _data_dir_option,
    )):
        command = option(command)
    return command


def _tls_context(tls: bool, tls_ca: str | None):
    """What the clients' ``tls`` argument takes for ``--tls`` / ``--tls-ca``."""
    import ssl

    return ssl.create_default_context(cafile=tls_ca) if tls_ca else tls


@main.command()
@click.argument("batch_id")
@click.argument("customer_id")
@click.option("--client", "client_id", default=None,
              help="Client id (UUID) the batch must belong to.")
@click.option("--request-id", default=None,
              help="Idempotency key: the same id always returns the same code.")
@_server_options
def claim(batch_id: str, customer_id: str, client_id: str | None, request_id: str | None,
          host: str, port: int, token: str | None, timeout: float, tls: bool,
          tls_ca: str | None, data_dir: str | None) -> None:
    """Claim a code of BATCH_ID for CUSTOMER_ID from a running `ango serve`; print it.

    Exit status as for every command (README "Exit status"): 0 the code printed,
    1 refused (expired, exhausted, rule, bad input), 3 no such batch, 4 a wrong
    token, 5 unavailable: nothing listens (known at once) or no answer in time
    (then the claim may still be issued: retry with the --request-id printed),
    6 no token found.
    """
    from ango.client import Client
    from ango.errors import Unavailable

    try:
        with Client(host, port, token, timeout, data_dir=data_dir,
                    tls=_tls_context(tls, tls_ca), wait_for_server=False) as client:
            code = client.claim(batch_id, customer_id, client_id=client_id, request_id=request_id)
    except Unavailable as exc:
        retry = (f"; it may still be issued: retry with --request-id {exc.request_id}"
                 if getattr(exc, "request_id", None) else "")
        raise Failure(exc, prefix=f"{exc.code}: ", suffix=retry) from None
    except AngoError as exc:
        raise Failure(exc, prefix=f"{exc.code}: ") from None
    click.echo(code)


@main.command()
@_dsn_option
@_data_dir_option
@click.option("--shards", default=None, type=click.IntRange(1, 256), help="Shard processes.")
def demo(dsn: str | None, data_dir: str | None, shards: int | None) -> None:
    """Import a demo batch, serve it, claim codes over TCP, print the counts."""
    from ango.demo import run_demo

    run_demo(dsn, data_dir, shards=shards, echo=click.echo)


@main.group()
def db() -> None:
    """The embedded PostgreSQL (used when no DSN is configured)."""


def _embedded_dir(data_dir: str | None):
    from ango.config import configured_dsn
    from ango.config import data_dir as resolve_data_dir

    if configured_dsn():
        click.echo("note: ANGO_DSN or DATABASE_URL is set: commands use that server, "
                   "not this one", err=True)
    return resolve_data_dir(data_dir)


@db.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_data_dir_option
def db_status(as_json: bool, data_dir: str | None) -> None:
    """Say whether the embedded PostgreSQL runs; exit 3 if it does not."""
    from ango.config import embedded_status

    status = embedded_status(_embedded_dir(data_dir))
    if as_json:
        click.echo(json.dumps(status.to_dict()))
    elif status.running:
        where = f"socket {status.socket_dir}, port {status.port}"
        click.echo(f"running (pid {status.pid}, {where}), data in {status.pgdata}")
    else:
        click.echo(f"stopped, data in {status.pgdata}" if status.exists
                   else f"no embedded PostgreSQL in {status.pgdata}")
    if not status.running:
        sys.exit(EXIT_NOT_FOUND)


@db.command("stop")
@_data_dir_option
def db_stop(data_dir: str | None) -> None:
    """Stop the embedded PostgreSQL (the next command that needs it starts it again)."""
    from ango.config import stop_embedded

    status = stop_embedded(_embedded_dir(data_dir))
    click.echo(f"stopped (pid {status.pid}), data in {status.pgdata}" if status.running
               else f"was not running, data in {status.pgdata}")


@main.command()
@click.option("--stale-seconds", default=5.0, show_default=True, type=click.FloatRange(0),
              help="An owner silent this long holds its codes unlawfully (I3).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_dsn_option
@_data_dir_option
def audit(stale_seconds: float, as_json: bool, dsn: str | None, data_dir: str | None) -> None:
    """Check the invariants from PostgreSQL alone; exit 1 if any is broken."""
    from ango.audit import check_invariants

    found = database.ready_dsn(dsn, data_dir)
    with database.connect(found, autocommit=True) as conn:
        result = check_invariants(conn, stale_seconds=stale_seconds)
    broken = {name: rows for name, rows in result.items() if rows}
    if as_json:
        click.echo(json.dumps({name: [list(map(str, r)) for r in rows]
                               for name, rows in result.items()}))
    else:
        for name, rows in result.items():
            click.echo(f"{'FAIL' if rows else 'ok':4}  {name}" + (f": {rows[:3]}" if rows else ""))
    if broken:
        sys.exit(1)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the server's answer as JSON.")
@_server_options
def stats(as_json: bool, host: str, port: int, token: str | None, timeout: float, tls: bool,
          tls_ca: str | None, data_dir: str | None) -> None:
    """Counters and health of a running `ango serve`: claims, shards, leases, database."""
    from ango.client import Client
    from ango.stats_table import stats_lines

    try:
        with Client(host, port, token, timeout, data_dir=data_dir,
                    tls=_tls_context(tls, tls_ca)) as client:
            found = client.stats()
    except AngoError as exc:
        raise Failure(exc, prefix=f"{exc.code}: ") from None
    if as_json:
        click.echo(json.dumps(found, indent=2, sort_keys=True))
    else:
        for line in stats_lines(found):
            click.echo(line)


@main.command()
@click.argument("code")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_dsn_option
@_data_dir_option
def lookup(code: str, as_json: bool, dsn: str | None, data_dir: str | None) -> None:
    """Who has CODE: its batch and, if issued, customer, time and request id."""
    from ango.lookup import lookup_code

    info = _on_db(dsn, data_dir, lookup_code, code)
    if as_json:
        click.echo(json.dumps(info.to_dict()))
        return
    for name, value in info.to_dict().items():
        if value is not None:
            click.echo(f"{name + ':':12} {value}")


@main.command()
@click.argument("customer_id")
@click.option("--batch", "batch_id", default=None, help="Only codes of this batch (UUID).")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 10_000),
              help="At most this many codes, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_dsn_option
@_data_dir_option
def customer(customer_id: str, batch_id: str | None, limit: int, as_json: bool,
             dsn: str | None, data_dir: str | None) -> None:
    """Every code CUSTOMER_ID received, newest first."""
    from ango.lookup import customer_codes

    rows = _on_db(dsn, data_dir, customer_codes, customer_id, batch_id, limit)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in rows]))
        return
    for r in rows:
        click.echo(f"{r.issued_at}  {r.batch_id}  {r.code}  {r.request_id}")


@main.command()
@click.argument("batch_id")
@click.option("--issued", "what", flag_value="issued",
              help="The issued codes: code, customer_id, issued_at, request_id.")
@click.option("--available", "what", flag_value="available",
              help="The codes not issued, in import order.")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv",
              show_default=True, help="CSV with a header, or one JSON object per line.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write to this file (default: standard output).")
@click.option("--json", "as_json", is_flag=True,
              help="With -o: print a JSON summary instead of a sentence.")
@_dsn_option
@_data_dir_option
def export(batch_id: str, what: str | None, fmt: str, output: Path | None, as_json: bool,
           dsn: str | None, data_dir: str | None) -> None:
    """Stream BATCH_ID's issued or available codes (COPY ... TO STDOUT)."""
    from ango.export import export_codes, plan_export

    if what is None:
        raise click.UsageError("choose --issued or --available")
    if as_json and output is None:
        raise click.UsageError("--json needs -o FILE (the codes go to standard output)")

    def run(conn) -> int:
        plan = plan_export(conn, batch_id, what, fmt)  # checked before the file is made
        out = open(output, "wb") if output is not None else sys.stdout.buffer
        try:
            with _progress(plan.expected_rows, "exporting", as_json) as progress:
                return export_codes(conn, batch_id, what, out, fmt, progress=progress)
        finally:
            if output is not None:
                out.close()

    rows = _on_db(dsn, data_dir, run)
    if output is None:
        return
    if as_json:
        click.echo(json.dumps({"batch_id": batch_id, "what": what, "format": fmt,
                               "rows": rows, "file": str(output)}))
    else:
        click.echo(f"exported {rows} {what} codes to {output}", err=True)


@main.command()
@click.argument("batch_id")
@click.option("--starts-at", default=None,
              help="New start (ISO 8601 with a zone), or 'none' to clear it.")
@click.option("--expires-at", default=None,
              help="New end (ISO 8601 with a zone, in the future), or 'none' to clear it.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_dsn_option
@_data_dir_option
def schedule(batch_id: str, starts_at: str | None, expires_at: str | None, as_json: bool,
             dsn: str | None, data_dir: str | None) -> None:
    """Change when BATCH_ID hands out codes; prints the schedule."""
    from ango.schedules import UNCHANGED, set_schedule

    result = _on_db(dsn, data_dir, set_schedule, batch_id,
                    UNCHANGED if starts_at is None else starts_at,
                    UNCHANGED if expires_at is None else expires_at)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        click.echo(f"starts_at: {result.starts_at or '-'}  expires_at: {result.expires_at or '-'}")


@main.command()
@click.argument("batch_id")
@click.option("--set", "rules", required=True,
              help='New rules JSON, e.g. {"maxpercustomer": 1}; null removes every limit.')
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_dsn_option
@_data_dir_option
def rules(batch_id: str, rules: str, as_json: bool, dsn: str | None,
          data_dir: str | None) -> None:
    """Replace BATCH_ID's rules; every claim committed afterwards follows them."""
    result = _on_db(dsn, data_dir, batches_lib.set_rules, batch_id, rules)
    click.echo(json.dumps({"batch_id": batch_id, "rules": result}) if as_json
               else f"rules: {json.dumps(result)}")


@main.command()
@click.argument("batch_id")
@click.option("--purge", is_flag=True,
              help="Also remove the issued codes and the record of who got them.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation of --purge.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_dsn_option
@_data_dir_option
def delete(batch_id: str, purge: bool, yes: bool, as_json: bool, dsn: str | None,
           data_dir: str | None) -> None:
    """Delete an expired BATCH_ID's unissued codes and leases (issues are kept)."""
    if purge and not yes:
        click.confirm(f"Remove batch {batch_id} and the record of every code it issued?",
                      abort=True, err=True)
    result = _on_db(dsn, data_dir, batches_lib.delete_batch, batch_id, purge)
    if as_json:
        click.echo(json.dumps(result))
    elif purge:
        click.echo(f"purged {batch_id}: {result['codes_deleted']} codes, "
                   f"{result['issues_deleted']} issues")
    else:
        click.echo(f"deleted {result['codes_deleted']} unissued codes of {batch_id}")
