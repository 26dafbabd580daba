"""The limits that keep one connection from harming the server or the others."""

from __future__ import annotations

from dataclasses import dataclass

from ango.protocol import MAX_FRAME


@dataclass(frozen=True)
class Limits:
    """Per-server and per-connection limits of the protocol server.

    Breaking ``max_frame`` or sending garbage gets an error frame and the
    connection closed. ``max_in_flight`` and ``write_high_water`` are enforced
    by back-pressure instead: the server stops reading from a connection that
    has that many requests unanswered, or that does not read its responses,
    so a pipelining client is slowed, not cut off, and memory stays bounded.
    """

    #: Largest frame payload accepted, in bytes.
    max_frame: int = MAX_FRAME
    #: Requests of one connection being worked on at once; more wait in the socket.
    max_in_flight: int = 1024
    #: Open connections; one more is answered ``unavailable`` and closed.
    max_connections: int = 1024
    #: Seconds an authenticated connection may stay silent with nothing in flight.
    idle_timeout: float = 300.0
    #: Seconds a new connection has to send a good ``hello``.
    handshake_timeout: float = 5.0
    #: Connections that have not authenticated yet, server-wide. One more evicts
    #: the oldest of them (``unavailable``), so silent connections cannot hold
    #: the door shut: a client that sends its ``hello`` promptly always gets in.
    max_unauthenticated: int = 128
    #: Connections of one address that have not authenticated yet; one more is
    #: refused ``unavailable``.
    max_unauthenticated_per_address: int = 16
    #: Unsent response bytes of one connection at which the server stops reading it.
    write_high_water: int = 1024 * 1024
    #: Unsent response bytes at which it reads again.
    write_low_water: int = 256 * 1024
    #: Seconds before the first wrong token of an address is answered; each
    #: further one within ``auth_failure_window`` waits that much longer, up to
    #: ``auth_failure_max_delay``. The connection is held meanwhile (reading
    #: nothing) and counts against its address's ``max_unauthenticated_per_address``,
    #: so one address tests at most that many tokens per ``auth_failure_max_delay``.
    #: A correct token is never delayed nor refused.
    auth_failure_delay: float = 0.25
    #: The longest a wrong token waits for its answer.
    auth_failure_max_delay: float = 5.0
    #: Seconds over which wrong tokens are counted per address (from the last one).
    auth_failure_window: float = 60.0
    #: Addresses whose wrong tokens are remembered (the oldest are forgotten first).
    max_auth_failure_addresses: int = 65536
    #: Seconds a shutdown waits for claims in flight before closing anyway.
    shutdown_grace: float = 30.0
