"""kvserve's gRPC service as Serve's gRPC proxy registers it, tolerant of malformed
messages.

The generated ``add_KVServeServicer_to_server`` parses requests with
``GenerateRequest.FromString`` in the proxy; bytes that are not a valid message make it
raise there, and the client gets UNKNOWN. This registration parses leniently instead:
a message that does not parse reaches the router as a ``Malformed`` value, and the
router answers INVALID_ARGUMENT naming the problem. Otherwise the same handlers as the
generated code (``GRPC_SERVICERS`` in ``cluster.app`` names this function).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from protos import kvserve_pb2 as pb

SERVICE = "kvserve.v1.KVServe"


@dataclass(frozen=True)
class Malformed:
    """A request whose bytes did not parse as ``message_type``."""

    message_type: str
    error: str

    @property
    def problem(self) -> str:
        return f"malformed {self.message_type} message: {self.error}"


def _lenient(cls: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError) as e:
            return Malformed(cls.DESCRIPTOR.full_name, str(e)[:200] or "cannot parse")

    return parse


def add_KVServeServicer_to_server(servicer: Any, server: Any) -> None:
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, request_deserializer=_lenient(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream, request_deserializer=_lenient(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels, request_deserializer=_lenient(pb.ListModelsRequest),
            response_serializer=pb.ListModelsResponse.SerializeToString),
    }  # fmt: skip
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if hasattr(server, "add_registered_method_handlers"):  # grpcio >= 1.65
        server.add_registered_method_handlers(SERVICE, handlers)
