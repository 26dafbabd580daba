"""Every failure a caller of Ango can act on, as one exception class each.

The server sends these over the wire by ``code`` (see docs/PROTOCOL.md) and the
clients raise the same classes, so embedded and remote callers handle errors alike.
Subclasses that only say more (the ``Database*`` kinds of ``Unavailable``,
``ImportInterrupted``) travel under their parent's code: for a client of the
server, a database the server cannot use is the server being unavailable.
"""

from __future__ import annotations


class AngoError(Exception):
    """Ango could not do what was asked."""

    code = "error"
    retryable = False
    #: The request id of the claim that failed, set by the clients (see docs/PROTOCOL.md).
    request_id: str | None = None

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class InvalidInput(AngoError):
    """The request is malformed."""

    code = "invalid_input"


class BatchNotFound(AngoError):
    """No such batch (for this client)."""

    code = "batch_not_found"


class BatchExpired(AngoError):
    """The batch has expired; no code of it is handed out any more."""

    code = "batch_expired"


class BatchNotStarted(AngoError):
    """The batch's schedule has not started yet; its codes are handed out from ``starts_at``."""

    code = "batch_not_started"


class BatchExhausted(AngoError):
    """Every code of the batch has been issued."""

    code = "batch_exhausted"


class RuleViolation(AngoError):
    """The customer has reached the batch's limit for the current window."""

    code = "rule_violation"


class Unavailable(AngoError):
    """Ango cannot answer right now; retry with the same request id."""

    code = "unavailable"
    retryable = True


class DatabaseUnavailable(Unavailable):
    """PostgreSQL cannot be reached right now (down, starting, too many clients); retry."""


class DatabaseRefused(Unavailable):
    """PostgreSQL refused Ango's user, password or privileges."""


class DatabaseMissing(Unavailable):
    """The database named in the DSN does not exist."""


class ImportFailed(AngoError):
    """The import was rejected; nothing was imported."""

    code = "import_failed"


class ImportInterrupted(ImportFailed):
    """The database interrupted the import; nothing was imported and a retry is safe."""

    retryable = True


class ConfigurationError(AngoError):
    """Ango is not configured correctly."""

    code = "configuration"


class DatabaseError(AngoError):
    """PostgreSQL refused a statement for a reason Ango did not expect."""


class AuthenticationFailed(AngoError):
    """The server refused the token."""

    code = "unauthorized"


class ProtocolError(AngoError):
    """The peer broke the wire protocol."""

    code = "protocol"


ERRORS_BY_CODE: dict[str, type[AngoError]] = {
    cls.code: cls
    for cls in (
        AngoError,
        InvalidInput,
        BatchNotFound,
        BatchExpired,
        BatchExhausted,
        RuleViolation,
        BatchNotStarted,
        Unavailable,
        ImportFailed,
        ConfigurationError,
        AuthenticationFailed,
        ProtocolError,
    )
}


def error_from_code(code: str, message: str) -> AngoError:
    """Rebuild the exception a peer reported as ``code``."""
    return ERRORS_BY_CODE.get(code, AngoError)(message)
