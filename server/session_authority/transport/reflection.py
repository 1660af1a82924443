"""Server reflection, for grpcurl and buf curl: both protocol versions, every
symbol, and the proto's comments.

grpcio-reflection's servicer answers from protobuf's default descriptor pool,
and three things a grpcurl user needs are missing there:

* the pool (upb) resolves no method and no enum value by name, so
  ``grpcurl describe <service>.<method>`` answered "Symbol not found";
* the generated ``*_pb2`` modules carry no source info, so ``describe``
  showed no comment;
* it serves ``grpc.reflection.v1alpha`` only, not ``grpc.reflection.v1``
  (buf curl and newer grpcurl ask for v1 first).

So the server answers reflection from an index of its own, built once at
start-up from the files that declare the served services (and their
imports): every symbol a file declares, methods and enum values included,
names its file. Our own files carry their comments: the source info that
``proto/generate.sh`` wrote into ``descriptors.binpb`` (protoc
``--include_source_info``), grafted onto the stubs' own descriptors. The two
protocol versions are the same messages under two package names (v1 is
v1alpha renamed, field for field), so one handler decodes both with
v1alpha's classes, and the v1 file served to clients is v1alpha's renamed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2 as rpb

from session_authority.v1 import session_authority_pb2

__all__ = ["REFLECTION_SERVICES", "ReflectionIndex", "add_reflection"]

_V1ALPHA = rpb.DESCRIPTOR.services_by_name["ServerReflection"].full_name
_V1 = "grpc.reflection.v1.ServerReflection"
#: Both versions of the reflection service, as listed and served.
REFLECTION_SERVICES = (_V1, _V1ALPHA)
_SOURCE_INFO = "descriptors.binpb"  # beside the generated stubs (proto/generate.sh)


class FileDescriptor(Protocol):
    """A proto file's descriptor (protobuf's own class, or upb's)."""

    @property
    def name(self) -> str: ...
    @property
    def dependencies(self) -> Sequence[FileDescriptor]: ...
    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None: ...


class ServiceDescriptor(Protocol):
    @property
    def full_name(self) -> str: ...
    @property
    def file(self) -> FileDescriptor: ...


class ReflectionIndex:
    """Every file the server describes (serialized ``FileDescriptorProto``s),
    which file declares each symbol, and the services to list."""

    def __init__(self, services: Iterable[ServiceDescriptor]) -> None:
        services = list(services)
        files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        for service in services:
            _collect(service.file, files)
        _collect(rpb.DESCRIPTOR, files)
        v1 = _renamed_v1(files[rpb.DESCRIPTOR.name])
        files[v1.name] = v1
        for commented in _source_info():
            if commented.name in files:
                _with_comments(files[commented.name], commented)
        self.services = tuple(sorted({s.full_name for s in services} | set(REFLECTION_SERVICES)))
        self._files = {name: proto.SerializeToString() for name, proto in files.items()}
        self._imports = {name: tuple(proto.dependency) for name, proto in files.items()}
        self._symbols: dict[str, str] = {}
        self._messages: set[str] = set()
        self._extensions: dict[tuple[str, int], str] = {}
        for name, proto in files.items():
            for symbol, is_message in _symbols(proto):
                self._symbols.setdefault(symbol, name)
                if is_message:
                    self._messages.add(symbol)
            for extendee, number in _extensions(proto):
                self._extensions[(extendee, number)] = name

    def answer(self, request: rpb.ServerReflectionRequest) -> rpb.ServerReflectionResponse:
        kind = request.WhichOneof("message_request")
        reply = rpb.ServerReflectionResponse(original_request=request)
        if kind == "list_services":
            reply.list_services_response.service.extend(
                rpb.ServiceResponse(name=name) for name in self.services
            )
            return reply
        if kind == "all_extension_numbers_of_type":
            base = request.all_extension_numbers_of_type
            if base not in self._messages:
                return _not_found(reply, f"message type {base}")
            numbers = sorted(n for (t, n) in self._extensions if t == base)
            reply.all_extension_numbers_response.base_type_name = base
            reply.all_extension_numbers_response.extension_number.extend(numbers)
            return reply
        if kind == "file_by_filename":
            what = f"file {request.file_by_filename}"
            name = request.file_by_filename if request.file_by_filename in self._files else None
        elif kind == "file_containing_symbol":
            what = f"symbol {request.file_containing_symbol}"
            name = self._symbols.get(request.file_containing_symbol)
        elif kind == "file_containing_extension":
            ext = request.file_containing_extension
            what = f"extension {ext.extension_number} of {ext.containing_type}"
            name = self._extensions.get((ext.containing_type, ext.extension_number))
        else:
            reply.error_response.error_code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            reply.error_response.error_message = "no request in ServerReflectionRequest"
            return reply
        if name is None:
            return _not_found(reply, what)
        reply.file_descriptor_response.file_descriptor_proto.extend(
            self._files[f] for f in self._with_imports(name)
        )
        return reply

    def _with_imports(self, name: str) -> list[str]:
        """``name`` first, then every file it imports, each once."""
        order = [name]
        for current in order:
            order.extend(d for d in self._imports[current] if d not in order)
        return order


def add_reflection(server: grpc.aio.Server, services: Iterable[ServiceDescriptor]) -> None:
    """Serve reflection (v1 and v1alpha) describing ``services`` and itself,
    registered as the generated ``add_..._to_server`` functions do."""
    index = ReflectionIndex(services)

    async def reflect(
        requests: AsyncIterator[rpb.ServerReflectionRequest], context: Any
    ) -> AsyncIterator[rpb.ServerReflectionResponse]:
        async for request in requests:
            yield index.answer(request)

    for service in REFLECTION_SERVICES:
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                reflect,
                request_deserializer=rpb.ServerReflectionRequest.FromString,
                response_serializer=rpb.ServerReflectionResponse.SerializeToString,
            )
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_registered_method_handlers(service, handlers)


def _not_found(reply: rpb.ServerReflectionResponse, what: str) -> rpb.ServerReflectionResponse:
    reply.error_response.error_code = grpc.StatusCode.NOT_FOUND.value[0]
    reply.error_response.error_message = f"{what} not found"
    return reply


def _collect(file: FileDescriptor, into: dict[str, descriptor_pb2.FileDescriptorProto]) -> None:
    if file.name in into:
        return
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    into[file.name] = proto
    for dependency in file.dependencies:
        _collect(dependency, into)


def _source_info() -> list[descriptor_pb2.FileDescriptorProto]:
    """Our protos with their comments, as protoc wrote them; none when the
    file is not installed (reflection then serves the same schema, uncommented)."""
    path = Path(session_authority_pb2.__file__).with_name(_SOURCE_INFO)
    if not path.is_file():
        return []
    return list(descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes()).file)


def _with_comments(
    proto: descriptor_pb2.FileDescriptorProto, commented: descriptor_pb2.FileDescriptorProto
) -> bool:
    """Graft ``commented``'s source info onto ``proto`` when both describe the
    same schema (its locations are paths into the schema: a stale file would
    put comments on the wrong elements; then none). The schema stays the
    stubs' own: protoc's descriptor set also sets every field's ``json_name``,
    and grpcurl then prints camelCase names instead of the proto names the
    runbook's paths use."""
    bare = descriptor_pb2.FileDescriptorProto()
    bare.CopyFrom(commented)
    bare.ClearField("source_code_info")
    for message in _all_messages(bare.message_type):
        for field in message.field:
            field.ClearField("json_name")
    if bare != proto:
        return False
    proto.source_code_info.CopyFrom(commented.source_code_info)
    return True


def _renamed_v1(v1alpha: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    v1 = descriptor_pb2.FileDescriptorProto()
    v1.CopyFrom(v1alpha)
    v1.name = "grpc/reflection/v1/reflection.proto"
    v1.package = "grpc.reflection.v1"
    v1.ClearField("options")
    for message in _all_messages(v1.message_type):
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name[len(old) :]
    for service in v1.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new, 1)
            method.output_type = method.output_type.replace(old, new, 1)
    return v1


def _all_messages(
    messages: Iterable[descriptor_pb2.DescriptorProto],
) -> Iterator[descriptor_pb2.DescriptorProto]:
    for message in messages:
        yield message
        yield from _all_messages(message.nested_type)


def _symbols(proto: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[str, bool]]:
    """Every full name ``proto`` declares, and whether it is a message type.
    An enum value is found both as protobuf scopes it (beside its enum) and
    under its enum's name."""
    scope = f"{proto.package}." if proto.package else ""

    def enum(e: descriptor_pb2.EnumDescriptorProto, scope: str) -> Iterator[tuple[str, bool]]:
        yield scope + e.name, False
        for value in e.value:
            yield scope + value.name, False
            yield f"{scope}{e.name}.{value.name}", False

    def message(m: descriptor_pb2.DescriptorProto, scope: str) -> Iterator[tuple[str, bool]]:
        name = scope + m.name
        yield name, True
        members = [f.name for f in (*m.field, *m.extension)] + [o.name for o in m.oneof_decl]
        for member in members:
            yield f"{name}.{member}", False
        for nested in m.nested_type:
            yield from message(nested, f"{name}.")
        for e in m.enum_type:
            yield from enum(e, f"{name}.")

    for m in proto.message_type:
        yield from message(m, scope)
    for e in proto.enum_type:
        yield from enum(e, scope)
    for extension in proto.extension:
        yield scope + extension.name, False
    for service in proto.service:
        yield scope + service.name, False
        for method in service.method:
            yield f"{scope}{service.name}.{method.name}", False


def _extensions(proto: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[str, int]]:
    extensions: list[descriptor_pb2.FieldDescriptorProto] = list(proto.extension)
    for message in _all_messages(proto.message_type):
        extensions.extend(message.extension)
    for extension in extensions:
        yield extension.extendee.lstrip("."), extension.number
