"""PostgresSessionStore and migrations against a real Postgres."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import asyncpg
import pytest

from session_authority.adapters.migrate import apply_migrations, available_migrations
from session_authority.adapters.postgres_store import PostgresSessionStore
from session_authority.config import Settings
from session_authority.core.breaker import Breaker
from session_authority.core.breaker_policy import BreakerState
from session_authority.core.domain import Session, TokenHash, new_token
from session_authority.core.errors import StoreBusy, StoreTimeout, StoreUnavailable
from session_authority.embedded import find_free_port

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


def _session(
    user_id: str | None = None, *, lifetime: timedelta = timedelta(hours=1)
) -> tuple[str, Session]:
    token = new_token()
    now = datetime.now(UTC)
    return token, Session(
        session_id=str(uuid4()),
        user_id=user_id or f"user-{uuid4().hex[:8]}",
        token_hash=TokenHash.of(token),
        created_at=now - timedelta(seconds=1),
        expires_at=now + lifetime,
        metadata={"k": "v"},
    )


async def test_migrations_are_idempotent_and_concurrent_safe(pg_dsn: str) -> None:
    conns = [await asyncpg.connect(pg_dsn) for _ in range(3)]
    try:
        results = await asyncio.gather(*(apply_migrations(c) for c in conns))
        assert all(r == [] for r in results)  # the fixture already migrated
        versions = await conns[0].fetch("SELECT version FROM schema_migrations ORDER BY 1")
        assert [r["version"] for r in versions] == [m.version for m in available_migrations()]
    finally:
        for c in conns:
            await c.close()


async def test_create_find_round_trip(store: PostgresSessionStore) -> None:
    _, session = _session()
    await store.create(session)
    found = await store.find(session.token_hash)
    assert found == session
    assert await store.find(TokenHash.of(new_token())) is None


async def test_only_the_hash_is_stored(store: PostgresSessionStore, pg_dsn: str) -> None:
    token, session = _session()
    await store.create(session)
    conn = await asyncpg.connect(pg_dsn)
    try:
        dump = await conn.fetchval("SELECT string_agg(t::text, '|') FROM sessions t")
    finally:
        await conn.close()
    assert token not in dump


async def test_a_revocation_is_stamped_and_left_pending_in_one_statement(
    store: PostgresSessionStore, pg_dsn: str
) -> None:
    """What the contract suite cannot see: the row itself. The revocation and its
    pending mark are one statement, stamped by Postgres's clock."""
    _, a = _session()
    _, b = _session()
    await store.create(a)
    await store.create(b)
    first = await store.revoke(token_hash=a.token_hash)
    assert first is not None and first.revoked_now
    conn = await asyncpg.connect(pg_dsn)
    try:
        row = await conn.fetchrow(
            "SELECT revoked_at, purge_pending, now() - revoked_at AS age FROM sessions"
            " WHERE token_hash = $1",
            bytes.fromhex(a.token_hash.hex),
        )
        assert row is not None
        assert row["purge_pending"] is True
        assert timedelta(0) <= row["age"] < timedelta(seconds=5)
        await store.confirm_purged([a.token_hash])
        pending = await conn.fetchval("SELECT count(*) FROM sessions WHERE purge_pending")
        assert pending == 0
        await conn.execute("SET enable_seqscan = off")  # a tiny table: ask what it *can* use
        plan = await conn.fetch(
            "EXPLAIN SELECT token_hash FROM sessions WHERE purge_pending"
            " ORDER BY revoked_at LIMIT 10"
        )
        text = "\n".join(r[0] for r in plan)
        assert "sessions_purge_pending_idx" in text  # the drain reads the partial index
    finally:
        await conn.close()


async def test_health_and_pool_stats(store: PostgresSessionStore) -> None:
    health = await store.health()
    assert health.connected and health.version.startswith("16")
    assert health.pool.max_size == 10 and health.pool.size >= 1 and health.pool.pending == 0


async def test_unreachable_database_raises_store_unavailable() -> None:
    store = PostgresSessionStore(
        f"postgresql://postgres@127.0.0.1:{find_free_port()}/nope",
        min_size=1,
        max_size=2,
        command_timeout=1,
        acquire_timeout=1,
        connect_timeout=1,
    )
    with pytest.raises(StoreUnavailable):
        await store.find(TokenHash.of(new_token()))
    health = await store.health()
    assert health.connected is False and health.error
    await store.aclose()


async def test_a_pool_queue_does_not_open_the_postgres_breaker(pg_dsn: str) -> None:
    """More callers than pooled connections: the ones that wait out the pool
    fail (``StoreBusy``, UNAVAILABLE for their callers), but Postgres answered
    the others meanwhile, so the waits are this process's queue and the
    breaker stays closed (counted as excused slowness, not as failures)."""
    # A wait of 500 ms, and 3,000 callers at once: most wait it out, while
    # finds (well under 1 ms each here) keep being answered for the others
    # meanwhile. The wait must outlast the machine's stalls: with 100 ms, a
    # host whose hypervisor took the CPU away (a noisy AMD host, 2026-12-03:
    # 15 to 70 s of steal in 150 s) let a whole wait pass with no answer, and
    # that rightly counts.
    store = PostgresSessionStore(
        pg_dsn,
        min_size=1,
        max_size=1,
        command_timeout=5.0,
        acquire_timeout=0.5,
    )
    breaker = Breaker(Settings().pg_breaker_policy(), name="postgres", error=StoreUnavailable)
    await store.connect()
    outcomes: list[object] = []
    try:
        missing = TokenHash.of(new_token())
        # Waves until both kinds are plenty, however fast this machine is: each wave
        # larger than the last until some wait the pool out (3,000 finds once all
        # fitted in 500 ms: none waited, and there was nothing to show).
        for wave in range(20):
            outcomes += await asyncio.gather(
                *(
                    breaker.call(lambda: store.find(missing))
                    for _ in range(3000 * 2 ** min(wave, 4))
                ),
                return_exceptions=True,
            )
            if sum(isinstance(o, StoreBusy) for o in outcomes) >= 20 and outcomes.count(None) >= 20:
                break
    finally:
        await breaker.aclose()
        await store.aclose()
    busy = [o for o in outcomes if isinstance(o, StoreBusy)]
    answered = [o for o in outcomes if o is None]
    assert len(busy) + len(answered) == len(outcomes), {type(o) for o in outcomes}
    # Enough of each to open it: the rule is 20 failures in a row (or half of 20).
    assert len(busy) >= 20 and len(answered) >= 20, (len(busy), len(answered))
    assert "pool exhausted" in str(busy[0])
    assert breaker.state is BreakerState.CLOSED
    assert breaker.slow_excused == len(busy)


async def test_statements_stuck_behind_a_lock_do_not_open_the_postgres_breaker(
    pg_dsn: str,
) -> None:
    """Reads of ``sessions`` wait on a lock past their statement timeout
    (``StoreTimeout``) while Postgres answers other statements: slow calls,
    excused. Once nothing else is answered, the same timeouts count and the
    breaker opens (a Postgres that answers nothing is cut off as before)."""
    quick = PostgresSessionStore(
        pg_dsn, min_size=1, max_size=40, command_timeout=0.1, acquire_timeout=5.0
    )
    breaker = Breaker(Settings().pg_breaker_policy(), name="postgres", error=StoreUnavailable)
    locker = await asyncpg.connect(pg_dsn)
    try:
        await quick.connect()
        async with locker.transaction():
            await locker.execute("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
            missing = TokenHash.of(new_token())
            blocked = [
                asyncio.ensure_future(breaker.call(lambda: quick.find(missing))) for _ in range(25)
            ]
            while not all(t.done() for t in blocked):  # Postgres answers others meanwhile
                await breaker.call(quick.health)
            outcomes = [t.exception() for t in blocked]
            assert all(isinstance(o, StoreTimeout) for o in outcomes), outcomes
            assert breaker.state is BreakerState.CLOSED
            assert breaker.slow_excused == len(blocked)
            for _ in range(Settings().pg_breaker_policy().consecutive_failures):
                with pytest.raises(StoreTimeout):
                    await breaker.call(lambda: quick.find(missing))  # nothing else answered
            assert _state(breaker) is BreakerState.OPEN
    finally:
        await breaker.aclose()
        await quick.aclose()
        await locker.close()


def _state(breaker: Breaker) -> BreakerState:
    """(A call: mypy would keep ``state`` narrowed by an earlier assert.)"""
    return breaker.state
