"""Undo what xds-protos' wheel does to the packages it overlaps (run after each install).

xds-protos (Envoy's API, for the ext_authz service) ships copies of files that belong to
other distributions: opentelemetry/proto/** (an older opentelemetry-proto: with it the OTLP
exporter fails to import, "cannot import name 'InstrumentationScope'"), google/api|rpc|type/**
(googleapis-common-protos), and an ``__init__.py`` in ``opentelemetry/`` and ``google/``, which
turns those namespace packages into regular ones (import-linter then cannot see
``opentelemetry.sdk``). Whichever wheel the installer unpacks last wins. The caller reinstalls
opentelemetry-proto and googleapis-common-protos after the install (`uv sync
--reinstall-package`), so that their files win; this removes the two ``__init__.py`` files,
which no other distribution owns. Exits 1 when the OTLP exporter still cannot be imported.
"""

from __future__ import annotations

import importlib.metadata
import sys
import sysconfig
from pathlib import Path


def main() -> int:
    site = Path(sysconfig.get_paths()["purelib"])
    for name in ("opentelemetry/__init__.py", "google/__init__.py"):
        owners = [
            d.metadata["Name"]
            for d in importlib.metadata.distributions()
            if any(str(f) == name for f in d.files or ())
        ]
        if owners == ["xds-protos"] and (site / name).exists():
            (site / name).unlink()
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: F401
            OTLPSpanExporter,
        )
    except ImportError as exc:
        print(f"the OTLP exporter does not import: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
