"""The admin port of ``serve --workers N``: one HTTP server in the supervisor
that speaks for every worker.

Each worker runs the usual admin app (``admin.AdminServer``) on a Unix socket
of its own; the supervisor binds ``ADMIN_HOST:ADMIN_PORT`` and asks all of
them on each request:

=====================  ==========================================================
``/metrics``           every worker's exposition (same format negotiation),
                       merged family by family, each sample labelled
                       ``worker="<index>"``: sum or max over ``worker`` for the
                       replica (``sum without (worker) (rate(...))``); the
                       alert rules group by ``job``/``instance`` and still hold
``/health``            one document for the replica: the worst ``status``; cache
``/api/health/redis``  counters, hit rate, pool numbers and L1 entries summed;
                       each breaker as the worst worker's; Redis/Postgres
                       ``connected`` and L1 ``live`` only when true of every
                       worker; plus ``workers``: each one's pid, status and
                       breaker states
``/livez``             200 while the supervisor runs (it stops when a worker dies)
``/readyz``            200 while every worker says SERVING; 503 while draining
=====================  ==========================================================

A worker that does not answer is left out of ``/metrics`` (a comment names
it), counts as ``unhealthy`` in ``/health`` and makes ``/readyz`` 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import hdrs, web

from session_authority.observability.health_json import rfc3339

__all__ = ["FleetAdmin", "combine_health", "merge_expositions"]

_log = logging.getLogger("session_authority.observability")

_STATUS_RANK = {"healthy": 0, "degraded": 1, "unhealthy": 2}
_BREAKER_RANK = {"closed": 0, "half_open": 1, "open": 2}
_POOL_FIELDS = ("size", "available", "pending", "minSize", "maxSize")
_META = ("# HELP ", "# TYPE ", "# UNIT ")
_EOF = "# EOF"
_TIMEOUT = aiohttp.ClientTimeout(total=10)


class FleetAdmin:
    """The supervisor's admin HTTP server over the workers' Unix sockets
    (``sockets[i]`` is worker ``i``'s, whose pid is ``pids[i]``)."""

    def __init__(self, sockets: Sequence[str], pids: Sequence[int]) -> None:
        self._sockets = list(sockets)
        self._pids = list(pids)
        self._clients: list[aiohttp.ClientSession] = []
        self._runner: web.AppRunner | None = None
        self.draining = False
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        """Bind and serve. Raises ``OSError`` when the port cannot be bound."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        app.router.add_get("/api/health/redis", self._health)
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._clients = [
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path), timeout=_TIMEOUT)
            for path in self._sockets
        ]
        bound = runner.addresses
        self.port = int(bound[0][1]) if bound else port
        _log.info(
            "admin HTTP server on %s:%d for %d workers (/metrics, /health, /livez, /readyz)",
            host,
            self.port,
            len(self._sockets),
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for client in self._clients:
            await client.close()
        self._clients = []

    async def _ask(
        self, path: str, headers: Mapping[str, str] | None = None
    ) -> list[tuple[int, str, str] | None]:
        """``(status, content type, body)`` from every worker, None where one
        did not answer."""

        async def one(client: aiohttp.ClientSession) -> tuple[int, str, str] | None:
            try:
                async with client.get(f"http://worker{path}", headers=headers) as reply:
                    return reply.status, reply.content_type, await reply.text()
            except (aiohttp.ClientError, OSError, TimeoutError):
                return None

        return await asyncio.gather(*(one(client) for client in self._clients))

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        accept = ",".join(request.headers.getall(hdrs.ACCEPT, []))
        replies = await self._ask("/metrics", {hdrs.ACCEPT: accept} if accept else None)
        answered = [(i, r) for i, r in enumerate(replies) if r is not None and r[0] == 200]
        if not answered:
            return web.Response(status=503, text="no worker answered\n")
        content_type = answered[0][1][1]  # the same negotiation in every worker
        openmetrics = "openmetrics" in content_type
        body = merge_expositions([(i, r[2]) for i, r in answered], openmetrics=openmetrics)
        missing = sorted(set(range(len(replies))) - {i for i, _ in answered})
        if missing and not openmetrics:  # OpenMetrics allows no free comments
            body = f"# workers not answering: {missing}\n{body}"
        response = web.Response(body=body.encode(), content_type=content_type)
        if "gzip" in request.headers.get(hdrs.ACCEPT_ENCODING, ""):
            response.enable_compression()
        return response

    async def _health(self, request: web.Request) -> web.Response:
        docs: list[dict[str, Any] | None] = []
        for reply in await self._ask("/health"):
            doc = None
            if reply is not None:
                with contextlib.suppress(ValueError):
                    doc = json.loads(reply[2])
            docs.append(doc if isinstance(doc, dict) else None)
        combined = combine_health(docs, self._pids)
        status = 503 if combined["status"] == "unhealthy" else 200
        return web.json_response(combined, status=status)

    async def _livez(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if not self.draining:
            replies = await self._ask("/readyz")
            if all(reply is not None and reply[0] == 200 for reply in replies):
                return web.Response(text="SERVING\n")
        return web.Response(text="NOT_SERVING\n", status=503)


def _labelled(line: str, worker: int) -> str:
    """A sample line with ``worker="<index>"`` as its first label."""
    for at, char in enumerate(line):
        if char == "{":
            rest = line[at + 1 :]
            sep = "" if rest.startswith("}") else ","
            return f'{line[: at + 1]}worker="{worker}"{sep}{rest}'
        if char == " ":
            return f'{line[:at]}{{worker="{worker}"}}{line[at:]}'
    return line


def merge_expositions(parts: Sequence[tuple[int, str]], *, openmetrics: bool = False) -> str:
    """Several expositions of the same families (classic text or OpenMetrics,
    as prometheus_client writes them: metadata lines, then that family's
    samples) as one: each family's metadata once, then every worker's samples
    for it, labelled by worker."""
    families: dict[str, tuple[list[str], list[str]]] = {}
    for worker, text in parts:
        current: tuple[list[str], list[str]] | None = None
        for line in text.splitlines():
            if not line or line == _EOF:
                continue
            if line.startswith(_META):
                name = line.split(" ", 3)[2]
                current = families.setdefault(name, ([], []))
                kind = line[:7]
                if not any(meta.startswith(kind) for meta in current[0]):
                    current[0].append(line)
                continue
            if line.startswith("#"):
                continue
            if current is None:  # a sample without metadata: a family of its own
                name = line.split("{", 1)[0].split(" ", 1)[0]
                current = families.setdefault(name, ([], []))
            current[1].append(_labelled(line, worker))
    lines = [line for meta, samples in families.values() for line in (*meta, *samples)]
    if openmetrics:
        lines.append(_EOF)
    return "\n".join(lines) + "\n"


def _worst(values: Sequence[str], rank: Mapping[str, int]) -> str:
    return max(values, key=lambda value: rank.get(value, len(rank)))


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _sum_pools(pools: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    return {name: sum(int(pool.get(name, 0)) for pool in pools) for name in _POOL_FIELDS}


def combine_health(
    docs: Sequence[dict[str, Any] | None], pids: Sequence[int], now: datetime | None = None
) -> dict[str, Any]:
    """One health document for the replica from each worker's (``docs[i]`` is
    worker ``i``'s, None when it did not answer). Rules: the module docstring."""
    answered = [doc for doc in docs if doc is not None]
    silent = [worker for worker, doc in enumerate(docs) if doc is None]
    workers = _worker_entries(docs, pids)
    stamp = rfc3339(now or datetime.now(UTC))
    unanswered = [f"worker {w} (pid {pids[w]}) did not answer" for w in silent]
    if not answered:
        return {"status": "unhealthy", "timestamp": stamp, "errors": unanswered, "workers": workers}
    statuses = [doc["status"] for doc in answered] + ["unhealthy"] * len(silent)
    combined = dict(answered[0])
    combined["status"] = _worst(statuses, _STATUS_RANK)
    combined["timestamp"] = stamp
    reached = [doc["redis"] for doc in answered if doc["redis"]["connected"]]
    combined["redis"] = dict(reached[0] if reached else answered[0]["redis"])
    combined["redis"]["connected"] = len(reached) == len(docs)
    combined["sessionCache"] = _combined_cache([doc["sessionCache"] for doc in answered], silent)
    combined["performance"] = {
        name: max(_number(doc["performance"][name]) for doc in answered)
        for name in ("ping", "set", "get")
    }
    errors: list[str] = []
    for doc in answered:
        errors += [e for e in doc["errors"] if e not in errors]
    combined["errors"] = errors + unanswered
    combined["postgres"] = _combined_store([doc["postgres"] for doc in answered], silent)
    l1 = [doc["localCache"] for doc in answered if "localCache" in doc]
    if l1:
        combined["localCache"] = _combined_local(l1, len(docs))
    for key in ("breaker", "postgresBreaker"):
        breakers = [doc[key] for doc in answered if key in doc]
        if breakers:
            state = _worst([b["state"] for b in breakers], _BREAKER_RANK)
            combined[key] = next(b for b in breakers if b["state"] == state)
    combined["workers"] = workers
    return combined


def _worker_entries(
    docs: Sequence[dict[str, Any] | None], pids: Sequence[int]
) -> list[dict[str, Any]]:
    """Each worker's status and breaker states (unhealthy when it did not answer)."""
    workers: list[dict[str, Any]] = []
    for worker, (doc, pid) in enumerate(zip(docs, pids, strict=True)):
        entry: dict[str, Any] = {"worker": worker, "pid": pid, "status": "unhealthy"}
        if doc is not None:
            entry["status"] = doc["status"]
            for key in ("breaker", "postgresBreaker"):
                if key in doc:
                    entry[key] = doc[key]["state"]
        workers.append(entry)
    return workers


def _combined_cache(caches: list[dict[str, Any]], silent: list[int]) -> dict[str, Any]:
    hits = sum(int(c["metrics"]["hits"]) for c in caches)
    misses = sum(int(c["metrics"]["misses"]) for c in caches)
    return {
        "enabled": any(c["enabled"] for c in caches),
        "healthy": all(c["healthy"] for c in caches) and not silent,
        "metrics": {
            "hits": hits,
            "misses": misses,
            "errors": sum(int(c["metrics"]["errors"]) for c in caches),
            "total": hits + misses,
            "hitRate": round(100.0 * hits / (hits + misses), 2) if hits + misses else 0.0,
            "ttl": caches[0]["metrics"]["ttl"],
        },
        "pool": _sum_pools([c["pool"] for c in caches]),
    }


def _combined_store(stores: list[dict[str, Any]], silent: list[int]) -> dict[str, Any]:
    return {
        "connected": all(s["connected"] for s in stores) and not silent,
        "version": next((s["version"] for s in stores if s["version"]), stores[0]["version"]),
        "pool": _sum_pools([s["pool"] for s in stores]),
        "ping": max(_number(s["ping"]) for s in stores),
    }


def _combined_local(l1: list[dict[str, Any]], workers: int) -> dict[str, Any]:
    return {
        **l1[0],
        "enabled": any(c["enabled"] for c in l1),
        "live": all(c["live"] for c in l1) and len(l1) == workers,
        "entries": sum(int(c["entries"]) for c in l1),
        # A worker whose bus is not live names the fleet's state.
        "bus": next((c["bus"] for c in l1 if c.get("bus") != "live"), l1[0].get("bus", "")),
        "busRestarts": sum(int(c.get("busRestarts", 0)) for c in l1),
        "malformedMessages": sum(int(c.get("malformedMessages", 0)) for c in l1),
    }
