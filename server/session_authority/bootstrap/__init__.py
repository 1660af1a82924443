"""The composition root: settings in, a running server out. Nothing here runs
at import time.

Observability is wired here too: ``install_tracing`` once, then
``observability.Telemetry``: the core gets its ``CoreMetrics`` and both ports
timed, each breaker its listener, the gRPC server its tracing and metrics
interceptors, and the admin HTTP port starts with the server."""

from session_authority.bootstrap.app import App
from session_authority.bootstrap.building import Built, build_core
from session_authority.bootstrap.grpc_server import server_options
from session_authority.bootstrap.security import auth_policy
from session_authority.core.assembly import assemble_core

__all__ = ["App", "Built", "assemble_core", "auth_policy", "build_core", "server_options"]
