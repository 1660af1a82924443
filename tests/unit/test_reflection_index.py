"""The reflection index answers what grpcio-reflection's servicer could not
(a method's file, an enum value's, reflection v1's), and NOT_FOUND for the rest.
The e2e tier (tests/e2e/test_grpcurl.py) drives it with grpcurl."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2 as rpb

from session_authority.transport.handler import SERVICE_DESCRIPTOR
from session_authority.transport.reflection import ReflectionIndex, _source_info, _with_comments
from session_authority.v1 import session_authority_pb2 as pb

_OURS = "session_authority/v1/session_authority.proto"


@pytest.fixture(scope="module")
def index() -> ReflectionIndex:
    return ReflectionIndex([SERVICE_DESCRIPTOR, health_pb2.DESCRIPTOR.services_by_name["Health"]])


def _files(reply: rpb.ServerReflectionResponse) -> list[str]:
    protos = reply.file_descriptor_response.file_descriptor_proto
    return [descriptor_pb2.FileDescriptorProto.FromString(p).name for p in protos]


@pytest.mark.parametrize(
    ("symbol", "file"),
    [
        ("session_authority.v1.SessionAuthority.ValidateSession", _OURS),
        ("session_authority.v1.SOURCE_CACHE", _OURS),
        ("session_authority.v1.Source.SOURCE_CACHE", _OURS),
        ("session_authority.v1.Session.MetadataEntry", _OURS),
        ("grpc.health.v1.Health.Check", "grpc_health/v1/health.proto"),
        (
            "grpc.reflection.v1.ServerReflection.ServerReflectionInfo",
            "grpc/reflection/v1/reflection.proto",
        ),
    ],
)
def test_symbol_names_its_file_first(index: ReflectionIndex, symbol: str, file: str) -> None:
    reply = index.answer(rpb.ServerReflectionRequest(file_containing_symbol=symbol))
    assert reply.WhichOneof("message_response") == "file_descriptor_response"
    files = _files(reply)
    assert files[0] == file
    assert len(files) == len(set(files))  # each import once


def test_our_file_imports_come_along(index: ReflectionIndex) -> None:
    reply = index.answer(rpb.ServerReflectionRequest(file_by_filename=_OURS))
    assert "google/protobuf/timestamp.proto" in _files(reply)


@pytest.mark.parametrize(
    "request_",
    [
        rpb.ServerReflectionRequest(file_containing_symbol="no.such.Symbol"),
        rpb.ServerReflectionRequest(file_by_filename="no/such.proto"),
        rpb.ServerReflectionRequest(all_extension_numbers_of_type="no.such.Message"),
        rpb.ServerReflectionRequest(
            file_containing_extension=rpb.ExtensionRequest(
                containing_type="session_authority.v1.Session", extension_number=1000
            )
        ),
    ],
    ids=["symbol", "file", "extension-numbers", "extension"],
)
def test_unknown_is_not_found(
    index: ReflectionIndex, request_: rpb.ServerReflectionRequest
) -> None:
    reply = index.answer(request_)
    assert reply.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert reply.original_request == request_


def test_known_message_has_no_extensions(index: ReflectionIndex) -> None:
    reply = index.answer(
        rpb.ServerReflectionRequest(all_extension_numbers_of_type="session_authority.v1.Session")
    )
    assert reply.all_extension_numbers_response.base_type_name == "session_authority.v1.Session"
    assert list(reply.all_extension_numbers_response.extension_number) == []


def test_lists_both_reflection_versions(index: ReflectionIndex) -> None:
    reply = index.answer(rpb.ServerReflectionRequest(list_services=""))
    assert [s.name for s in reply.list_services_response.service] == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "session_authority.v1.SessionAuthority",
    ]


def test_comments_only_on_the_schema_they_were_written_for() -> None:
    """descriptors.binpb's comments are grafted onto the stubs' descriptor;
    one written for another schema (a stale file) is not."""
    stub = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(stub)
    (commented,) = (f for f in _source_info() if f.name == _OURS)
    assert commented.source_code_info.location, "descriptors.binpb carries no comments"
    assert _with_comments(stub, commented)
    assert stub.source_code_info == commented.source_code_info
    assert not any(f.json_name for m in stub.message_type for f in m.field)

    stale = descriptor_pb2.FileDescriptorProto()
    stale.CopyFrom(commented)
    stale.message_type[0].field[0].number += 100
    other = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(other)
    assert not _with_comments(other, stale)
    assert not other.HasField("source_code_info")
