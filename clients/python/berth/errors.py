"""Errors from the dispatcher, with the ``google.rpc`` details it sends."""

from __future__ import annotations

from typing import List, Optional, Tuple

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class BerthError(Exception):
    """A failed call: the gRPC ``code`` and ``message``, plus the details a
    program acts on without parsing text.

    - ``reason``: the ``ErrorInfo`` reason (``INVALID_FIELD``,
      ``SESSION_NOT_FOUND``, ``RATE_LIMITED``, ``OVERLOADED``…), or None;
    - ``field_violations``: ``[(field, description)]`` from ``BadRequest``;
    - ``retry_after``: seconds from ``RetryInfo``, or None when a retry
      would not help.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: Optional[str] = None,
        field_violations: Optional[List[Tuple[str, str]]] = None,
        retry_after: Optional[float] = None,
    ):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.field_violations = field_violations or []
        self.retry_after = retry_after

    @classmethod
    def from_rpc_error(cls, e: grpc.RpcError) -> "BerthError":
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        message = e.details() if hasattr(e, "details") else str(e)
        reason, violations, retry = None, [], None
        try:
            status = rpc_status.from_call(e)
        except ValueError:
            status = None
        for detail in status.details if status else []:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = [(v.field, v.description) for v in bad.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                retry = info.retry_delay.ToTimedelta().total_seconds()
        return cls(code, message or "", reason, violations, retry)
