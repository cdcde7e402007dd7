"""Server reflection that serves har.v1's comments, so `grpcurl describe` shows the documentation.

grpcio-reflection answers from the descriptors of the generated modules, which carry no source
info: `grpcurl describe har.v1.PredictRequest` printed bare fields, without the limits and
meanings written in protos/har/v1/har.proto. scripts/gen_protos.py also writes every .proto's
descriptor with its comments to har_flax/proto/descriptors.binpb; this servicer hands those out
in place of the bare ones (same file, same fields: only the comments are added).
"""

from __future__ import annotations

from importlib import resources

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc


def _clear_json_names(messages) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _clear_json_names(message.nested_type)


def documented_files() -> dict[str, bytes]:
    """Serialized FileDescriptorProtos with source info, by file name (``har/v1/har.proto``).

    Without protoc's ``json_name``s, as the generated modules' descriptors are: with them,
    grpcurl would print ``numClasses`` where it has always printed ``num_classes``.
    """
    data = resources.files("har_flax.proto").joinpath("descriptors.binpb").read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    for f in files:
        _clear_json_names(f.message_type)
    return {f.name: f.SerializeToString() for f in files}


class DocumentedReflectionServicer(reflection.ReflectionServicer):
    """grpcio-reflection's servicer, with har.v1's descriptors served with their comments."""

    def __init__(self, service_names, documented: dict[str, bytes] | None = None):
        super().__init__(service_names)
        self._documented = documented_files() if documented is None else documented

    def ServerReflectionInfo(self, request_iterator, context):
        for response in super().ServerReflectionInfo(request_iterator, context):
            if response.HasField("file_descriptor_response"):
                files = response.file_descriptor_response.file_descriptor_proto
                for i, raw in enumerate(files):
                    name = descriptor_pb2.FileDescriptorProto.FromString(raw).name
                    files[i] = self._documented.get(name, raw)
            yield response


def enable_documented_reflection(service_names, server: grpc.Server) -> None:
    """Like ``reflection.enable_server_reflection``, serving the comments of our .proto files."""
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        DocumentedReflectionServicer(service_names), server
    )
