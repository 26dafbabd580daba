"""The Ango protocol server (installed as ``ango.server``): see docs/PROTOCOL.md."""

from .limits import Limits
from .metrics import Metrics
from .protocol_server import NOOP_CODE, ProtocolServer
from .runner import log_startup, serve, serve_async

__all__ = ["NOOP_CODE", "Limits", "Metrics", "ProtocolServer", "log_startup", "serve",
           "serve_async"]
