"""berth: a Python client for the berth dispatcher's public gRPC API, sync
(``Client``) and asyncio (``AsyncClient``), each with every public RPC
(``client.rpc.<service>.<method>``).

The stubs in ``berth.v1`` are generated from the repository's ``proto/`` at
install time; this package adds auth, typed events, event streams that
resume after a dropped connection, ``run()``, and structured errors.
"""

from .aio import AsyncClient
from .client import Client, RunResult, SessionEnded
from .errors import BerthError
from .events import (
    AgentMessage,
    Event,
    StatusChange,
    ToolPermission,
    ToolResult,
    ToolUse,
    Usage,
    UserMessage,
    parse_event,
)

__all__ = [
    "AgentMessage",
    "AsyncClient",
    "BerthError",
    "Client",
    "Event",
    "RunResult",
    "SessionEnded",
    "StatusChange",
    "ToolPermission",
    "ToolResult",
    "ToolUse",
    "Usage",
    "UserMessage",
    "parse_event",
]
