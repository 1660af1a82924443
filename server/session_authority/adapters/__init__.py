"""Adapters: the ports implemented on Redis and Postgres."""

from session_authority.adapters.postgres_store import PostgresSessionStore
from session_authority.adapters.redis_cache import RedisSessionCache

__all__ = ["PostgresSessionStore", "RedisSessionCache"]
