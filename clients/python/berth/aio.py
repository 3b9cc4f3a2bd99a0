"""The asyncio client (``grpc.aio``): the same calls as ``Client``, awaited.

    async with berth.AsyncClient("http://127.0.0.1:7000", token) as c:
        s = await c.create_session("echo hi", image="berth-test-agent:latest")
        async for e in c.stream_events(s.name):
            ...
        await c.rpc.schedules.list_schedules()
"""

from __future__ import annotations

import asyncio
import os
from typing import AsyncIterator, Dict, Optional, Sequence

import grpc

from . import requests
from .client import _ENDED, RunResult, SessionEnded, _channel_args
from .errors import BerthError
from .events import Event, StatusChange, Usage, parse_event
from .rpc import Rpc
from .v1 import sessions_pb2


def _with_key(details, header):
    metadata = grpc.aio.Metadata(*(details.metadata or ()), header)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)


# One class per kind: grpc.aio files an interceptor under its first kind only.
class _UnaryAuth(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds ``authorization: Bearer <key>`` to every unary call."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_key(details, self._header), request)


class _StreamAuth(grpc.aio.UnaryStreamClientInterceptor):
    """Adds ``authorization: Bearer <key>`` to every server stream."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_key(details, self._header), request)


class AsyncClient:
    """A dispatcher client for asyncio; ``target`` and ``token`` as for
    ``Client``. ``rpc`` has every public RPC (see ``berth.rpc``)."""

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
        interceptors = [_UnaryAuth(token), _StreamAuth(token)] if token else None
        if creds:
            self.channel = grpc.aio.secure_channel(addr, creds, options=opts, interceptors=interceptors)
        else:
            self.channel = grpc.aio.insecure_channel(addr, options=opts, interceptors=interceptors)
        self.rpc = Rpc(self.channel, aio=True)

    @classmethod
    def from_env(cls, **kw) -> "AsyncClient":
        """From ``BERTH_DISPATCHER``, ``BERTH_TOKEN`` and ``BERTH_CA``."""
        ca = os.environ.get("BERTH_CA")
        if ca and "root_certificates" not in kw:
            with open(ca, "rb") as f:
                kw["root_certificates"] = f.read()
        return cls(os.environ.get("BERTH_DISPATCHER", "http://127.0.0.1:7000"), os.environ.get("BERTH_TOKEN"), **kw)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def create_session(self, prompt: str = "", **create):
        """As ``Client.create_session``."""
        return await self.rpc.sessions.create_session(requests.create_session(prompt, **create))

    async def get_session(self, session: str):
        return await self.rpc.sessions.get_session(name=requests.session_name(session))

    async def send(self, session: str, text: str) -> int:
        return (await self.rpc.sessions.send_message(name=requests.session_name(session), text=text)).seq

    async def stop(self, session: str):
        return await self.rpc.sessions.stop_session(name=requests.session_name(session))

    async def answer_question(self, session: str, tool_use_id: str, answers: Dict[str, requests.Answer]) -> int:
        """As ``Client.answer_question``."""
        return (await self.rpc.sessions.answer_question(requests.answer_question(session, tool_use_id, answers))).seq

    async def list_events(self, session: str, after_seq: int = 0, page_size: int = 500) -> AsyncIterator[Event]:
        token = ""
        while True:
            page = await self.rpc.sessions.list_events(
                name=requests.session_name(session), after_seq=after_seq, page_size=page_size, page_token=token
            )
            for e in page.events:
                yield parse_event(e)
            if not page.next_page_token:
                return
            token = page.next_page_token

    async def stream_events(
        self, session: str, after_seq: int = 0, *, max_interruption: float = 300.0, timeout: Optional[float] = None
    ) -> AsyncIterator[Event]:
        """As ``Client.stream_events``: resumed from the last seq after a
        dropped stream, no event skipped or repeated."""
        name = requests.session_name(session)
        resume = requests.Resume(max_interruption, timeout)
        while True:
            req = sessions_pb2.StreamEventsRequest(name=name, after_seq=after_seq)
            call = self.rpc.sessions.stream_events(req, timeout=resume.remaining())
            try:
                async for e in call:
                    resume.streaming()
                    if e.seq <= after_seq:
                        continue
                    after_seq = e.seq
                    yield parse_event(e)
                return
            except grpc.RpcError as err:
                await asyncio.sleep(resume.pause_after(err))
            finally:
                call.cancel()

    async def run(self, prompt: str, *, keep: bool = False, timeout: Optional[float] = None, **create) -> RunResult:
        """As ``Client.run``."""
        s = await self.create_session(prompt, **create)
        result = RunResult(session=s)
        ended = True
        try:
            async for e in self.stream_events(s.name, timeout=timeout):
                result.events.append(e)
                if isinstance(e, Usage):
                    result.usage, ended = e, False
                    break
                if isinstance(e, StatusChange) and e.status in _ENDED:
                    break
            result.session = await self.get_session(s.name)
            if ended or result.usage is None:
                raise SessionEnded(result.session, result.events)
            return result
        finally:
            if not keep:
                try:
                    await self.stop(s.name)
                except BerthError:
                    pass  # already stopped or ended
