"""The Ango protocol server (installed as ``ango.server``): see docs/PROTOCOL.md."""

from .limits import Limits
from .protocol_server import NOOP_CODE, ProtocolServer
from .runner import serve, serve_async

__all__ = ["NOOP_CODE", "Limits", "ProtocolServer", "serve", "serve_async"]
