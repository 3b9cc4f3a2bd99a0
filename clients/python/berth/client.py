"""The client: an authenticated channel, the generated stubs, every public
RPC (``rpc``), and the calls services need most, with errors as
``BerthError``."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

import grpc

from . import requests
from .errors import BerthError
from .events import AgentMessage, Event, StatusChange, Usage, parse_event
from .rpc import Rpc
from .v1 import (
    access_pb2,
    access_pb2_grpc,
    agents_pb2_grpc,
    audit_pb2_grpc,
    nodes_pb2_grpc,
    schedules_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    webhooks_pb2_grpc,
)

# Statuses in which a session no longer runs its turn.
_ENDED = {"stopped", "failed", "paused", "stopping", "archived"}


class SessionEnded(Exception):
    """The session left its run (stopped, failed, paused) before its turn ended."""

    def __init__(self, session, events: List[Event]):
        status = sessions_pb2.SessionStatus.Name(session.status).removeprefix("SESSION_STATUS_").lower()
        super().__init__(f"session {session.id} ended before its turn did: {status} ({session.status_reason})")
        self.session = session
        self.events = events


@dataclass
class RunResult:
    """What ``Client.run`` returns: the session (after the turn), every
    event of the turn, the agent's text, and the turn's ``Usage`` event."""

    session: object
    events: List[Event] = field(default_factory=list)
    usage: Optional[Usage] = None

    @property
    def text(self) -> str:
        return "\n".join(e.text for e in self.events if isinstance(e, AgentMessage))


class _Auth(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call."""

    def __init__(self, token: str):
        self._md = ("authorization", f"Bearer {token}")

    def _with_token(self, details):
        md = list(details.metadata or []) + [self._md]
        return details._replace(metadata=md) if hasattr(details, "_replace") else _Details(details, md)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


class _Details(grpc.ClientCallDetails):
    def __init__(self, d, metadata):
        self.method = d.method
        self.timeout = d.timeout
        self.metadata = metadata
        self.credentials = d.credentials
        self.wait_for_ready = getattr(d, "wait_for_ready", None)
        self.compression = getattr(d, "compression", None)


def _target(url: str) -> tuple:
    """``http://host:port`` / ``https://host:port`` / ``host:port`` → (target, tls)."""
    if url.startswith("https://"):
        return url[len("https://"):].rstrip("/"), True
    if url.startswith("http://"):
        return url[len("http://"):].rstrip("/"), False
    return url, False


def _channel_args(target, root_certificates, private_key, certificate_chain, server_name, options):
    """The address, TLS credentials (None for plain http) and options of a
    channel to ``target``, for the sync and the asyncio client alike."""
    addr, tls = _target(target)
    opts = [("grpc.max_receive_message_length", 16 * 1024 * 1024), *options]
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain) if tls else None
    return addr, creds, opts


class Client:
    """A dispatcher client.

    ``target`` is ``http://host:port``, ``https://host:port`` (TLS; pass
    ``root_certificates`` for a private CA, ``private_key`` and
    ``certificate_chain`` for mTLS) or ``host:port``. ``token`` is an API key
    (``berth_…``); None only against a dispatcher in dev mode.
    """

    def __init__(
        self,
        target: str = "http://127.0.0.1:7000",
        token: Optional[str] = None,
        *,
        root_certificates: Optional[bytes] = None,
        private_key: Optional[bytes] = None,
        certificate_chain: Optional[bytes] = None,
        server_name: Optional[str] = None,
        options: Sequence[tuple] = (),
    ):
        addr, creds, opts = _channel_args(target, root_certificates, private_key, certificate_chain, server_name, options)
        channel = grpc.secure_channel(addr, creds, options=opts) if creds else grpc.insecure_channel(addr, options=opts)
        self._raw = channel
        self.channel = grpc.intercept_channel(channel, _Auth(token)) if token else channel
        self.sessions = sessions_pb2_grpc.SessionsStub(self.channel)
        self.agents = agents_pb2_grpc.AgentsStub(self.channel)
        self.files = sessions_pb2_grpc.FilesStub(self.channel)
        self.nodes = nodes_pb2_grpc.NodesStub(self.channel)
        self.api_keys = access_pb2_grpc.ApiKeysStub(self.channel)
        self.secrets = access_pb2_grpc.SecretsStub(self.channel)
        self.schedules = schedules_pb2_grpc.SchedulesStub(self.channel)
        self.webhooks = webhooks_pb2_grpc.WebhooksStub(self.channel)
        self.audit = audit_pb2_grpc.AuditStub(self.channel)
        # Every public RPC, by snake_case name, with errors as BerthError.
        self.rpc = Rpc(self.channel)

    @classmethod
    def from_env(cls, **kw) -> "Client":
        """From ``BERTH_DISPATCHER`` (default ``http://127.0.0.1:7000``),
        ``BERTH_TOKEN`` and ``BERTH_CA`` (a CA file for https)."""
        ca = os.environ.get("BERTH_CA")
        if ca and "root_certificates" not in kw:
            with open(ca, "rb") as f:
                kw["root_certificates"] = f.read()
        return cls(os.environ.get("BERTH_DISPATCHER", "http://127.0.0.1:7000"), os.environ.get("BERTH_TOKEN"), **kw)

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _call(method, request, timeout: Optional[float] = 30.0):
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as e:
            raise BerthError.from_rpc_error(e) from None

    @staticmethod
    def _name(session: str) -> str:
        return requests.session_name(session)

    # --- sessions -----------------------------------------------------------

    def create_session(self, prompt: str = "", **create):
        """Queues a session and returns it (``berth.v1.Session``). Give
        ``agent`` (``NAME`` or ``NAME@VERSION``) or ``image``; further
        ``AgentSpec`` fields as keywords (``runtime``, ``model``, ``labels``,
        ``display_name``…). ``request_id`` makes a retry return the same
        session (a fresh one is made per call)."""
        return self._call(self.sessions.CreateSession, requests.create_session(prompt, **create))

    def get_session(self, session: str):
        return self._call(self.sessions.GetSession, sessions_pb2.GetSessionRequest(name=self._name(session)))

    def list_sessions(self, *, status: Optional[str] = None, labels: Optional[Dict[str, str]] = None, page_size: int = 100) -> Iterator:
        """Every session matching the filter, newest first, across pages."""
        token = ""
        while True:
            req = sessions_pb2.ListSessionsRequest(page_size=page_size, page_token=token, labels=labels or {})
            if status:
                req.status = sessions_pb2.SessionStatus.Value(f"SESSION_STATUS_{status.upper()}")
            page = self._call(self.sessions.ListSessions, req)
            yield from page.sessions
            if not page.next_page_token:
                return
            token = page.next_page_token

    def send(self, session: str, text: str) -> int:
        """Sends a user message; returns its event's seq."""
        return self._call(self.sessions.SendMessage, sessions_pb2.SendMessageRequest(name=self._name(session), text=text)).seq

    def interrupt(self, session: str) -> int:
        return self._call(self.sessions.Interrupt, sessions_pb2.InterruptRequest(name=self._name(session))).seq

    def stop(self, session: str):
        return self._call(self.sessions.StopSession, sessions_pb2.StopSessionRequest(name=self._name(session)))

    def approve(self, session: str, tool_use_id: str, *, always: bool = False) -> int:
        req = sessions_pb2.ConfirmToolRequest(
            name=self._name(session), tool_use_id=tool_use_id, decision=sessions_pb2.TOOL_DECISION_ALLOW, always=always
        )
        return self._call(self.sessions.ConfirmTool, req).seq

    def deny(self, session: str, tool_use_id: str, message: str = "Denied by the user.") -> int:
        req = sessions_pb2.ConfirmToolRequest(
            name=self._name(session), tool_use_id=tool_use_id, decision=sessions_pb2.TOOL_DECISION_DENY, message=message
        )
        return self._call(self.sessions.ConfirmTool, req).seq

    def answer_question(self, session: str, tool_use_id: str, answers: Dict[str, requests.Answer]) -> int:
        """Answers the agent's questions (an ``agent.question`` event):
        ``{question or header: "Label" | ["Label", …] | {"labels": […],
        "text": "own words"}}``. Returns the answer's seq."""
        req = requests.answer_question(session, tool_use_id, answers)
        return self._call(self.sessions.AnswerQuestion, req).seq

    def whoami(self):
        return self._call(self.api_keys.WhoAmI, access_pb2.WhoAmIRequest())

    # --- events -------------------------------------------------------------

    def list_events(self, session: str, after_seq: int = 0, page_size: int = 500) -> Iterator[Event]:
        """The session's stored events after ``after_seq``, across pages."""
        token = ""
        while True:
            req = sessions_pb2.ListEventsRequest(name=self._name(session), after_seq=after_seq, page_size=page_size, page_token=token)
            page = self._call(self.sessions.ListEvents, req)
            for e in page.events:
                yield parse_event(e)
            if not page.next_page_token:
                return
            token = page.next_page_token

    def stream_events(
        self, session: str, after_seq: int = 0, *, max_interruption: float = 300.0, timeout: Optional[float] = None
    ) -> Iterator[Event]:
        """The session's events after ``after_seq``, then live ones, until the
        session leaves its run (the stream ends) or the caller stops
        iterating. A dropped stream is opened again from the last seq
        yielded, with a growing, jittered backoff; no event is skipped or
        repeated. Gives up (BerthError) after ``max_interruption`` seconds
        without a stream, or with DEADLINE_EXCEEDED once ``timeout`` seconds
        have passed in all."""
        name = self._name(session)
        resume = requests.Resume(max_interruption, timeout)
        while True:
            req = sessions_pb2.StreamEventsRequest(name=name, after_seq=after_seq)
            call = self.sessions.StreamEvents(req, timeout=resume.remaining())
            try:
                for e in call:
                    resume.streaming()
                    if e.seq <= after_seq:
                        continue
                    after_seq = e.seq
                    yield parse_event(e)
                return
            except grpc.RpcError as err:
                time.sleep(resume.pause_after(err))
            finally:
                call.cancel()

    # --- run ----------------------------------------------------------------

    def run(self, prompt: str, *, keep: bool = False, timeout: Optional[float] = None, **create) -> RunResult:
        """Creates a session with ``prompt`` (``create``: as ``create_session``),
        waits for its turn to end, and returns the turn. Stops the session
        afterwards unless ``keep``. Raises ``SessionEnded`` if the session
        ends first, and ``BerthError`` (DEADLINE_EXCEEDED) when the turn is
        not over after ``timeout`` seconds (the session is stopped)."""
        s = self.create_session(prompt, **create)
        result = RunResult(session=s)
        ended = False
        try:
            for e in self.stream_events(s.name, timeout=timeout):
                result.events.append(e)
                if isinstance(e, Usage):
                    result.usage = e
                    break
                if isinstance(e, StatusChange) and e.status in _ENDED:
                    ended = True
                    break
            else:
                ended = True
            result.session = self.get_session(s.name)
            if ended or result.usage is None:
                raise SessionEnded(result.session, result.events)
            return result
        finally:
            if not keep:
                try:
                    self.stop(s.name)
                except BerthError:
                    pass  # already stopped or ended
