"""Typed session events. Every event has ``seq``, ``type``, ``time`` and
``payload`` (its JSON payload as a dict); the common ones get a class with
their fields. ``raw_event`` is the wire message."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Dict, Optional


@dataclass
class Event:
    session_id: str
    seq: int
    type: str
    time: Optional[datetime]
    payload: Dict[str, Any]
    raw_event: Any = field(repr=False, default=None)

    @property
    def ends_turn(self) -> bool:
        """True for ``session.usage``: the turn's last event."""
        return self.type == "session.usage"


@dataclass
class UserMessage(Event):
    text: str = ""


@dataclass
class AgentMessage(Event):
    text: str = ""


@dataclass
class ToolUse(Event):
    tool_use_id: str = ""
    name: str = ""
    input: Any = None


@dataclass
class ToolResult(Event):
    tool_use_id: str = ""
    name: str = ""
    content: Any = None
    is_error: bool = False


@dataclass
class ToolPermission(Event):
    """The agent asks to run a tool: answer with ``Client.approve``/``deny``."""

    tool_use_id: str = ""
    tool_name: str = ""
    input: Any = None
    reason: str = ""


@dataclass
class StatusChange(Event):
    """``session.status_*``: ``status`` is the new one (``running``, ``idle``…)."""

    status: str = ""
    previous: str = ""
    reason: str = ""


@dataclass
class Usage(Event):
    """``session.usage``: the turn's figures and the session's totals."""

    turn: Dict[str, Any] = field(default_factory=dict)
    total: Dict[str, Any] = field(default_factory=dict)

    @property
    def cost_usd(self) -> float:
        return float(self.total.get("cost_usd", 0.0))


def parse_event(e: Any) -> Event:
    """The typed form of a wire ``berth.v1.Event``."""
    try:
        payload = json.loads(e.payload_json) if e.payload_json else {}
    except ValueError:
        payload = {"unparsed": e.payload_json}
    if not isinstance(payload, dict):
        payload = {"value": payload}
    time = e.create_time.ToDatetime() if e.HasField("create_time") else None
    base = dict(session_id=e.session_id, seq=e.seq, type=e.type, time=time, payload=payload, raw_event=e)
    get = payload.get
    t = e.type
    if t == "user.message":
        return UserMessage(**base, text=get("text", ""))
    if t == "agent.message":
        return AgentMessage(**base, text=get("text", ""))
    if t == "agent.tool_use":
        return ToolUse(**base, tool_use_id=get("tool_use_id", ""), name=get("name", ""), input=get("input"))
    if t == "agent.tool_result":
        return ToolResult(
            **base,
            tool_use_id=get("tool_use_id", ""),
            name=get("name", ""),
            content=get("content"),
            is_error=bool(get("is_error", False)),
        )
    if t == "agent.tool_permission":
        return ToolPermission(
            **base,
            tool_use_id=get("tool_use_id", ""),
            tool_name=get("tool_name", ""),
            input=get("input"),
            reason=get("reason", ""),
        )
    if t.startswith("session.status_"):
        return StatusChange(
            **base, status=t[len("session.status_"):], previous=get("previous", ""), reason=get("reason", "")
        )
    if t == "session.usage":
        return Usage(**base, turn=get("turn", {}), total=get("total", {}))
    return Event(**base)
