"""deploy/envoy and deploy/istio: parsed against what can judge them.

* ``deploy/envoy/envoy.yaml`` is parsed into Envoy's own
  ``envoy.config.bootstrap.v3.Bootstrap`` (xds-protos), every ``typed_config``
  Any resolved to its message: an unknown field, a misspelt type or a wrong
  value type fails. Then its promises: ext_authz before the router, pointed
  at a cluster that speaks HTTP/2, an explicit timeout, ``failure_mode_allow``
  false, no request body.
* Istio's CRDs are not in xds-protos, and kubernetes-validate knows no CRD:
  ``deploy/istio`` is checked structurally, against the field names written
  below (from Istio's API reference: ``MeshConfig.ExtensionProvider
  .EnvoyExternalAuthorizationGrpcProvider`` and ``AuthorizationPolicy``).
  That proves the files agree with that list and with each other, not that
  Istio accepts them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2

# Imported for their messages: the pool must know every type an Any names.
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format

pytestmark = pytest.mark.integration

_DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
_ENVOY = _DEPLOY / "envoy" / "envoy.yaml"
_MESH = _DEPLOY / "istio" / "mesh-config.yaml"
_POLICY = _DEPLOY / "istio" / "authorization-policy.yaml"

#: MeshConfig.ExtensionProvider.EnvoyExternalAuthorizationGrpcProvider's fields (Istio 1.2x).
_GRPC_PROVIDER_FIELDS = {
    "service",
    "port",
    "timeout",
    "failOpen",
    "clearRouteCache",
    "statusOnError",
    "includeRequestBodyInCheck",
}


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _parse_envoy(document: Any) -> Any:
    bootstrap = bootstrap_pb2.Bootstrap()
    json_format.ParseDict(document, bootstrap)  # strict: unknown fields raise
    return bootstrap


def _envoy_promises(bootstrap: Any) -> list[str]:
    """What the example promises; each broken promise named."""
    broken: list[str] = []
    (listener,) = bootstrap.static_resources.listeners
    hcm = hcm_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    names = [f.name for f in hcm.http_filters]
    if names != ["envoy.filters.http.ext_authz", "envoy.filters.http.router"]:
        broken.append(f"filters {names}: ext_authz then the router")
    authz = ext_authz_pb2.ExtAuthz()
    assert hcm.http_filters[0].typed_config.Unpack(authz)
    if authz.failure_mode_allow:
        broken.append("failure_mode_allow must be false")
    if not authz.grpc_service.HasField("timeout"):
        broken.append("grpc_service.timeout must be set (Envoy's default is 200 ms)")
    if authz.HasField("with_request_body"):
        broken.append("with_request_body must be unset")
    clusters = {c.name: c for c in bootstrap.static_resources.clusters}
    target = authz.grpc_service.envoy_grpc.cluster_name
    if target not in clusters:
        broken.append(f"grpc_service names cluster {target!r}, which is not defined")
    else:
        options = clusters[target].typed_extension_protocol_options
        http = options.get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
        protocol = http_protocol_options_pb2.HttpProtocolOptions()
        if (
            http is None
            or not http.Unpack(protocol)
            or not protocol.explicit_http_config.HasField("http2_protocol_options")
        ):
            broken.append(f"cluster {target!r} must speak HTTP/2 (gRPC)")
    return broken


def test_envoy_example_parses_into_envoys_bootstrap_and_keeps_its_promises() -> None:
    assert _envoy_promises(_parse_envoy(_load(_ENVOY))) == []


@pytest.mark.parametrize(
    ("path", "value", "says"),
    [
        (["failure_mode_allow"], True, "failure_mode_allow"),
        (["with_request_body"], {"max_request_bytes": 1024}, "with_request_body"),
        (["grpc_service", "envoy_grpc", "cluster_name"], "nowhere", "not defined"),
    ],
)
def test_envoy_promise_breach(path: list[str], value: Any, says: str) -> None:
    document = _load(_ENVOY)
    authz = _authz_config(document)
    target = authz
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert any(says in b for b in _envoy_promises(_parse_envoy(document)))


def test_envoy_timeout_removed_is_a_breach() -> None:
    document = _load(_ENVOY)
    del _authz_config(document)["grpc_service"]["timeout"]
    assert any("timeout" in b for b in _envoy_promises(_parse_envoy(document)))


@pytest.mark.parametrize(
    "plant",
    [
        lambda c: c.__setitem__("failure_mode_alow", False),  # misspelt field
        lambda c: c.__setitem__("@type", "type.googleapis.com/envoy.NoSuchFilter"),
        lambda c: c["grpc_service"].__setitem__("timeout", "half a second"),
    ],
)
def test_envoy_parse_rejects_a_wrong_config(plant: Any) -> None:
    document = copy.deepcopy(_load(_ENVOY))
    plant(_authz_config(document))
    with pytest.raises(json_format.ParseError):
        _parse_envoy(document)


def _authz_config(document: Any) -> dict[str, Any]:
    listener = document["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    config: dict[str, Any] = hcm["http_filters"][0]["typed_config"]
    return config


def _istio_problems(mesh: Any, policy: Any) -> list[str]:
    problems: list[str] = []
    providers = {p["name"]: p for p in mesh["meshConfig"]["extensionProviders"]}
    spec = policy["spec"]
    if policy["apiVersion"] not in ("security.istio.io/v1", "security.istio.io/v1beta1"):
        problems.append(f"apiVersion {policy['apiVersion']}")
    if policy["kind"] != "AuthorizationPolicy":
        problems.append(f"kind {policy['kind']}")
    if spec.get("action") != "CUSTOM":
        problems.append("action must be CUSTOM")
    name = spec.get("provider", {}).get("name")
    if name not in providers:
        problems.append(f"provider {name!r} is not in meshConfig.extensionProviders")
        return problems
    grpc = providers[name].get("envoyExtAuthzGrpc")
    if grpc is None:
        return [*problems, f"provider {name!r} is not envoyExtAuthzGrpc"]
    unknown = set(grpc) - _GRPC_PROVIDER_FIELDS
    if unknown:
        problems.append(f"unknown provider fields {sorted(unknown)}")
    if grpc.get("failOpen") is not False:
        problems.append("failOpen must be false")
    if "timeout" not in grpc:
        problems.append("timeout must be set (Istio's default is 600 s)")
    if grpc.get("includeRequestBodyInCheck"):
        problems.append("no request body")
    if grpc.get("port") != 50051:
        problems.append("port must be the gRPC port, 50051")
    return problems


def test_istio_provider_and_policy_agree() -> None:
    assert _istio_problems(_load(_MESH), _load(_POLICY)) == []


@pytest.mark.parametrize(
    ("plant", "says"),
    [
        (lambda m, p: p["spec"].__setitem__("action", "ALLOW"), "CUSTOM"),
        (lambda m, p: p["spec"]["provider"].__setitem__("name", "other"), "not in meshConfig"),
        (lambda m, p: _provider(m).__setitem__("failOpen", True), "failOpen"),
        (lambda m, p: _provider(m).pop("timeout"), "timeout"),
        (lambda m, p: _provider(m).__setitem__("failopen", False), "unknown provider fields"),
    ],
)
def test_istio_breach(plant: Any, says: str) -> None:
    mesh, policy = _load(_MESH), _load(_POLICY)
    plant(mesh, policy)
    assert any(says in problem for problem in _istio_problems(mesh, policy))


def _provider(mesh: Any) -> dict[str, Any]:
    grpc: dict[str, Any] = mesh["meshConfig"]["extensionProviders"][0]["envoyExtAuthzGrpc"]
    return grpc
