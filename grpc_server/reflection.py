"""Server reflection that serves har.v1's comments, so `grpcurl describe` shows the documentation.

grpcio-reflection answers from the descriptors of the generated modules, which carry no source
info: `grpcurl describe har.v1.PredictRequest` printed bare fields, without the limits and
meanings written in protos/har/v1/har.proto. scripts/gen_protos.py also writes every .proto's
descriptor with its comments to har_flax/proto/descriptors.binpb; this servicer hands those out
in place of the bare ones (same file, same fields: only the comments are added).

Both reflection protocols are served: ``grpc.reflection.v1`` (what buf curl, grpcurl 1.9+ and
grpcui try first, and all that some newer clients speak) and the older
``grpc.reflection.v1alpha``. grpcio-reflection ships v1alpha only; v1 is the same protocol
renamed (same messages, same field numbers, one wire format), so one servicer answers both.
"""

from __future__ import annotations

from importlib import resources

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"


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


def v1_file() -> descriptor_pb2.FileDescriptorProto:
    """``grpc/reflection/v1/reflection.proto``, made from grpcio-reflection's v1alpha file.

    The two differ in their names and file options only; the messages, their fields and the
    method are the same.
    """
    v1alpha = reflection_pb2.DESCRIPTOR.package
    f = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(f)
    f.name, f.package = V1_FILE, V1_SERVICE_NAME.rsplit(".", 1)[0]

    def renamed(type_name: str) -> str:
        return type_name.replace(f".{v1alpha}.", f".{f.package}.", 1)

    def rename_fields(messages) -> None:
        for message in messages:
            for field in message.field:
                if field.type_name:
                    field.type_name = renamed(field.type_name)
            rename_fields(message.nested_type)

    rename_fields(f.message_type)
    for method in (m for service in f.service for m in service.method):
        method.input_type, method.output_type = (
            renamed(method.input_type),
            renamed(method.output_type),
        )
    f.options.Clear()
    f.options.java_package = "io.grpc.reflection.v1"
    f.options.java_outer_classname = "ServerReflectionProto"
    f.options.java_multiple_files = True
    f.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    return f


def _register_v1_file() -> None:
    """Adds the v1 file to the default pool, where the servicer finds what it describes."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(V1_FILE)
    except KeyError:
        pool.AddSerializedFile(v1_file().SerializeToString())


def enable_documented_reflection(service_names, server: grpc.Server) -> None:
    """Like ``reflection.enable_server_reflection``, serving the comments of our .proto files,
    on both ``grpc.reflection.v1`` and ``grpc.reflection.v1alpha``.

    Args:
      service_names: the services that ``list_services`` names; both reflection services are
        added to them.
      server: the server to add reflection to.
    """
    _register_v1_file()
    names = tuple(dict.fromkeys([*service_names, V1_SERVICE_NAME, reflection.SERVICE_NAME]))
    servicer = DocumentedReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    # v1's messages have v1alpha's wire format, so v1alpha's classes (de)serialize them.
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": v1}),)
    )
