"""Typed views of the few third-party APIs the tests call whose own types are
missing: each is the library object itself, ``cast`` to the signature it has
at run time, so that a test calling it is checked as strictly as our own code.
Drop an entry once the library (or its typeshed stubs) declares the types.

* ``grpc_health``: typeshed's ``HealthStub`` declares only ``__init__``; the
  generated class sets ``Check`` and ``Watch`` there, so mypy sees neither.
* ``prometheus_client.openmetrics``: the parser and the exposition function
  are unannotated (the classic-format ones are annotated).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, cast

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from prometheus_client import CollectorRegistry, Metric
from prometheus_client.openmetrics import exposition, parser

__all__ = [
    "AioHealthStub",
    "HealthStub",
    "aio_health_stub",
    "generate_openmetrics",
    "health_stub",
    "parse_openmetrics",
]


class HealthStub(Protocol):
    """The standard health service on a blocking channel."""

    Check: grpc.UnaryUnaryMultiCallable[HealthCheckRequest, HealthCheckResponse]


class AioHealthStub(Protocol):
    """The standard health service on a ``grpc.aio`` channel."""

    Check: grpc.aio.UnaryUnaryMultiCallable[HealthCheckRequest, HealthCheckResponse]


def health_stub(channel: grpc.Channel) -> HealthStub:
    return cast(HealthStub, health_pb2_grpc.HealthStub(channel))


def aio_health_stub(channel: grpc.aio.Channel) -> AioHealthStub:
    return cast(AioHealthStub, health_pb2_grpc.HealthStub(channel))


#: ``prometheus_client.openmetrics.parser.text_string_to_metric_families``: the
#: strict OpenMetrics parser (raises ``ValueError`` on an invalid exposition).
parse_openmetrics = cast(Callable[[str], Iterable[Metric]], parser.text_string_to_metric_families)

#: ``prometheus_client.openmetrics.exposition.generate_latest``: a registry's
#: samples in the OpenMetrics text format.
generate_openmetrics = cast(Callable[[CollectorRegistry], bytes], exposition.generate_latest)
