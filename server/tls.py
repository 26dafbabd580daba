"""TLS for the protocol server, over memory BIOs inside each connection.

The connection does TLS itself instead of handing the socket to asyncio's TLS
transport, so that every byte still passes through it: a connection in its TLS
handshake counts against the budget of unauthenticated connections and the
handshake timeout like any other, and a plain-text client on a TLS-only port
gets a readable ``error`` frame instead of a dropped connection. Plain text
and TLS are told apart by the first byte: a frame starts with 0x00 (no
payload reaches 16 MiB), a TLS record with 0x16 (handshake).
"""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

from ango.errors import ConfigurationError

#: The first byte of a TLS handshake record.
TLS_HANDSHAKE = 0x16


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context for ``cert_file``/``key_file`` (PEM), TLS 1.2 or later."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load the TLS certificate {cert_file} with key "
                                 f"{key_file}: {exc.strerror or exc}") from None
    return context


def peer_context(cert_file: str) -> ssl.SSLContext:
    """The client context instances use to reach each other when they serve TLS: the
    system's certificate authorities plus ``cert_file`` itself (instances that share
    one certificate, self-signed or not, trust each other), host names checked."""
    context = ssl.create_default_context()
    try:
        context.load_verify_locations(cert_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot read the TLS certificate {cert_file}: "
                                 f"{getattr(exc, 'strerror', None) or exc}") from None
    return context


def self_signed(folder: str | Path, name: str = "localhost") -> tuple[str, str]:
    """Make a self-signed certificate for ``name`` and 127.0.0.1 in ``folder`` with the
    ``openssl`` command (for tests and trials, not production); return (cert, key) paths."""
    cert, key = str(Path(folder) / "cert.pem"), str(Path(folder) / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", f"/CN={name}", "-keyout", key, "-out", cert,
         "-addext", f"subjectAltName=DNS:{name},IP:127.0.0.1"],
        check=True, capture_output=True)
    return cert, key


class ServerTLS:
    """One connection's TLS state: bytes from the socket in, plain text out, and back."""

    __slots__ = ("_obj", "_incoming", "_outgoing", "ready", "closed")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        #: The handshake is done: frames may be written.
        self.ready = False
        #: The peer sent close_notify: no more plain text will come.
        self.closed = False

    def receive(self, data: bytes | bytearray) -> bytes:
        """Feed bytes from the socket; return the plain text they complete.

        Raises ``ssl.SSLError`` when the peer does not speak TLS properly. What
        the handshake has to send back is in :meth:`pending`.
        """
        self._incoming.write(data)
        if not self.ready:
            try:
                self._obj.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            self.ready = True
        chunks = []
        while True:
            try:
                chunk = self._obj.read(256 * 1024)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.closed = True
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def wrap(self, data: bytes | bytearray) -> bytes:
        """Encrypt ``data`` (after the handshake); return the bytes to send."""
        with memoryview(data) as view:
            done = 0
            while done < len(view):
                done += self._obj.write(view[done:])
        return self._outgoing.read()

    def pending(self) -> bytes:
        """Bytes TLS needs sent (handshake messages, alerts), if any."""
        return self._outgoing.read()

    def close_notify(self) -> bytes:
        """The close_notify alert to send before closing."""
        try:
            self._obj.unwrap()
        except ssl.SSLError:
            pass  # it does not wait for the peer's close_notify
        return self._outgoing.read()
