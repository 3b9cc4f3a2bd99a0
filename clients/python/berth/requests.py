"""Requests the sync and the asyncio client build the same way."""

from __future__ import annotations

import uuid
from typing import Dict, List, Optional, Union

from .v1 import sessions_pb2

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
