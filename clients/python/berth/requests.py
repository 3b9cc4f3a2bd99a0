"""Requests the sync and the asyncio client build the same way."""

from __future__ import annotations

import random
import time
import uuid
from typing import Dict, List, Optional, Union

import grpc

from .v1 import sessions_pb2

# Codes after which an event stream is opened again from the last seq seen:
# the dispatcher restarted, the connection dropped, a proxy cut it.
RESUMABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL}


class Resume:
    """When a dropped event stream is opened again: a growing, jittered
    backoff from 0.2 s to 5 s, given up after ``max_interruption`` seconds
    without a stream; and what is left of an overall ``timeout``."""

    def __init__(self, max_interruption: float, timeout: Optional[float]):
        self.max_interruption = max_interruption
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.interrupted_at: Optional[float] = None
        self.delay = 0.2

    def remaining(self) -> Optional[float]:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.001)

    def streaming(self) -> None:
        """An event arrived: the stream is healthy again."""
        self.interrupted_at, self.delay = None, 0.2

    def pause_after(self, err: grpc.RpcError) -> float:
        """Seconds to wait before reopening after ``err``; raises
        ``BerthError`` when it is not worth another try."""
        from .errors import BerthError

        now = time.monotonic()
        self.interrupted_at = self.interrupted_at or now
        if err.code() not in RESUMABLE or now - self.interrupted_at > self.max_interruption:
            raise BerthError.from_rpc_error(err) from None
        pause = self.delay * (0.5 + random.random())
        self.delay = min(self.delay * 2, 5.0)
        return pause


# An answer to one question: a label, several labels (multi select), or
# {"labels": [...], "text": "..."} for the person's own words ("Other").
Answer = Union[str, List[str], Dict[str, object]]


def session_name(session: str) -> str:
    return session if session.startswith("sessions/") else f"sessions/{session}"


def create_session(
    prompt: str = "",
    *,
    image: Optional[str] = None,
    agent: Optional[str] = None,
    runtime: str = "claude_code",
    model: str = "",
    labels: Optional[Dict[str, str]] = None,
    display_name: str = "",
    request_id: Optional[str] = None,
    **spec,
) -> sessions_pb2.CreateSessionRequest:
    """A ``CreateSessionRequest``: ``agent`` (``NAME`` or ``NAME@VERSION``)
    or ``image``, further ``AgentSpec`` fields as keywords; a fresh
    ``request_id`` unless given (a retry with it returns the same session)."""
    req = sessions_pb2.CreateSessionRequest(
        request_id=request_id or str(uuid.uuid4()),
        initial_message=prompt,
        labels=labels or {},
        display_name=display_name,
        agent=agent or "",
    )
    if image or not agent:
        req.spec.CopyFrom(
            sessions_pb2.AgentSpec(
                image=image or "",
                runtime=sessions_pb2.Runtime.Value(f"RUNTIME_{runtime.upper()}"),
                model=model,
                **spec,
            )
        )
    return req


def answer_question(session: str, tool_use_id: str, answers: Dict[str, Answer]) -> sessions_pb2.AnswerQuestionRequest:
    """An ``AnswerQuestionRequest`` from ``{question or header: answer}``."""
    out = []
    for question, a in answers.items():
        if isinstance(a, str):
            out.append(sessions_pb2.QuestionAnswer(question=question, labels=[a]))
        elif isinstance(a, dict):
            out.append(sessions_pb2.QuestionAnswer(question=question, labels=list(a.get("labels", [])), text=str(a.get("text", ""))))
        else:
            out.append(sessions_pb2.QuestionAnswer(question=question, labels=list(a)))
    return sessions_pb2.AnswerQuestionRequest(name=session_name(session), tool_use_id=tool_use_id, answers=out)
