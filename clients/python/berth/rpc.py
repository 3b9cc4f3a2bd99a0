"""Every public RPC as a method, made from the generated descriptors (so a
new RPC needs no code here): ``client.rpc.<service>.<method>(**fields)``,
both in snake_case (``client.rpc.schedules.create_schedule(schedule_id="x",
schedule={...})``). Fields are the request message's; a nested message may
be given as a dict. Errors are ``BerthError``.

With a ``grpc`` channel a unary method returns the reply; with a
``grpc.aio`` channel it returns an awaitable. A server-streaming method
returns the reply stream (an iterator, or an async iterator).
"""

from __future__ import annotations

import re
from typing import Any, Dict

import grpc
from google.protobuf import message_factory

from .errors import BerthError
from .v1 import access_pb2, agents_pb2, audit_pb2, nodes_pb2, schedules_pb2, sessions_pb2, webhooks_pb2

MODULES = (sessions_pb2, agents_pb2, nodes_pb2, access_pb2, schedules_pb2, webhooks_pb2, audit_pb2)


def snake(name: str) -> str:
    """``CreateApiKey`` → ``create_api_key``, ``ApiKeys`` → ``api_keys``."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def services() -> Dict[str, Any]:
    """Every public service descriptor, by full name."""
    out = {}
    for module in MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            out[service.full_name] = service
    return out


class _Method:
    def __init__(self, channel, method, aio: bool, timeout):
        self._request = message_factory.GetMessageClass(method.input_type)
        reply = message_factory.GetMessageClass(method.output_type)
        path = "/%s/%s" % (method.containing_service.full_name, method.name)
        kind = channel.unary_stream if method.server_streaming else channel.unary_unary
        self._call = kind(path, request_serializer=self._request.SerializeToString, response_deserializer=reply.FromString)
        self._streams = method.server_streaming
        self._aio = aio
        self._timeout = timeout
        self.__doc__ = "%s(%s) → %s" % (path, method.input_type.name, method.output_type.name)

    def request(self, request=None, **fields):
        if request is not None and fields:
            raise TypeError("give a request message or its fields, not both")
        return request if request is not None else self._request(**fields)

    def __call__(self, request=None, *, timeout=..., **fields):
        req = self.request(request, **fields)
        if timeout is ...:
            # A stream lasts as long as the session runs.
            timeout = None if self._streams else self._timeout
        if self._streams:
            return self._call(req, timeout=timeout)
        if self._aio:
            return self._await(req, timeout)
        try:
            return self._call(req, timeout=timeout)
        except grpc.RpcError as e:
            raise BerthError.from_rpc_error(e) from None

    async def _await(self, req, timeout):
        try:
            return await self._call(req, timeout=timeout)
        except grpc.RpcError as e:
            raise BerthError.from_rpc_error(e) from None


class _Service:
    def __init__(self, channel, service, aio: bool, timeout):
        self.full_name = service.full_name
        for method in service.methods:
            if method.client_streaming:
                continue  # Connect: the stub's bidirectional stream
            setattr(self, snake(method.name), _Method(channel, method, aio, timeout))


class Rpc:
    """``rpc.sessions``, ``rpc.files``, ``rpc.agents``, ``rpc.nodes``,
    ``rpc.api_keys``, ``rpc.secrets``, ``rpc.schedules``, ``rpc.webhooks``,
    ``rpc.audit``: each service's methods."""

    def __init__(self, channel, *, aio: bool = False, timeout=30.0):
        for service in services().values():
            setattr(self, snake(service.name), _Service(channel, service, aio, timeout))
