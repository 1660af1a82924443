"""The revocation bus's message format and batching (pure functions, no Redis)."""

from __future__ import annotations

from session_authority.adapters.redis_bus_wire import batch, parse, valid_hashes

H1, H2, H3 = "a" * 64, "b" * 64, "c" * 64


def test_concurrent_publishes_go_out_in_one_message_with_their_hashes_merged() -> None:
    outbox: list[tuple[str, list[str] | None]] = [("r1", [H1, H2]), ("r2", [H2, H3])]
    assert batch(outbox) == (["r1", "r2"], [H1, H2, H3])
    assert outbox == []


def test_drop_everything_absorbs_the_batch_and_a_big_batch_waits() -> None:
    outbox: list[tuple[str, list[str] | None]] = [("r1", [H1]), ("r2", None), ("r3", [H2])]
    assert batch(outbox) == (["r1"], [H1])  # a drop-everything starts a message of its own
    assert batch(outbox) == (["r2", "r3"], None)
    big = [f"{i:064x}" for i in range(1000)]
    outbox = [("r1", big), ("r2", [H1])]
    assert batch(outbox) == (["r1"], sorted(big))  # over 1,000 hashes: next message
    assert outbox == [("r2", [H1])]


def test_only_ascii_fields_parse_and_only_hex_digests_are_hashes() -> None:
    assert parse(b"s|r1,r2|" + H1.encode()) == ["s", "r1,r2", H1]
    for garbage in (b"\xff\xfe", b"", b"a||b", b"|", "é|x|y".encode()):
        assert parse(garbage) is None
    assert parse(42) is None
    assert valid_hashes([H1, H2])
    assert not valid_hashes([H1, "not-a-hash"])
    assert not valid_hashes([H1.upper()])
