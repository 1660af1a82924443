"""Domain values and input checks: pure functions, no I/O."""

from __future__ import annotations

import base64
import hashlib
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from session_authority.core.domain import (
    MAX_METADATA_ENTRIES,
    MAX_METADATA_KEY_BYTES,
    MAX_METADATA_VALUE_BYTES,
    MAX_TOKEN_LENGTH,
    MAX_USER_ID_LENGTH,
    TOKEN_BYTES,
    TOKEN_PREFIX,
    Reason,
    Session,
    TokenHash,
    check_metadata,
    check_session_id,
    check_ttl,
    check_user_id,
    is_well_formed,
    new_token,
    parse_token,
)
from session_authority.core.errors import InvalidArgument

URL_SAFE = re.compile(r"[A-Za-z0-9_-]+")
DEFAULT_TTL = timedelta(hours=24)
MAX_TTL = timedelta(days=30)


def _secret() -> str:
    """A distinctive, random token body, so a leak into a message is detectable."""
    return "s3cret" + uuid.uuid4().hex


# --- tokens --------------------------------------------------------------------


def test_parse_token_returns_the_sha256_of_the_token() -> None:
    token = new_token()
    assert parse_token(token) == TokenHash(hashlib.sha256(token.encode()).hexdigest())


@pytest.mark.parametrize(
    "make_bad",
    [
        pytest.param(lambda s: "", id="empty"),
        pytest.param(lambda s: s + "x" * MAX_TOKEN_LENGTH, id="oversized"),
        pytest.param(lambda s: s + "é", id="non-ascii"),
        pytest.param(lambda s: s + "☃", id="non-latin"),
        pytest.param(lambda s: " " + s, id="leading-space"),
        pytest.param(lambda s: s[:8] + " " + s[8:], id="inner-space"),
        pytest.param(lambda s: s + "\n", id="trailing-newline"),
        pytest.param(lambda s: "\t" + s, id="tab"),
        pytest.param(lambda s: s + "\x00", id="nul"),
        pytest.param(lambda s: s + "\x7f", id="del"),
    ],
)
def test_malformed_token_is_invalid_argument_naming_token_without_echoing_it(
    make_bad: Callable[[str], str],
) -> None:
    secret = _secret()
    bad = make_bad(secret)
    with pytest.raises(InvalidArgument) as info:
        parse_token(bad)
    assert info.value.field == "token"
    assert str(info.value).startswith("token: ")
    rendered = f"{info.value} {info.value!r} {info.value.problem} {info.value.args}"
    assert secret not in rendered
    if bad:
        assert bad.strip() not in rendered


def test_token_of_exactly_the_maximum_length_is_accepted() -> None:
    assert parse_token("a" * MAX_TOKEN_LENGTH).hex == hashlib.sha256(b"a" * 512).hexdigest()
    with pytest.raises(InvalidArgument):
        parse_token("a" * (MAX_TOKEN_LENGTH + 1))


def test_parse_token_names_the_field_it_is_given() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_token("", field_name="refresh_token")
    assert info.value.field == "refresh_token"


def test_token_hash_never_reveals_the_token_or_the_full_hash() -> None:
    token = new_token()
    token_hash = TokenHash.of(token)
    for text in (repr(token_hash), str(token_hash), f"{token_hash}"):
        assert token not in text
        assert token_hash.hex not in text
        assert token_hash.prefix in text
    assert len(token_hash.hex) == 64
    assert token_hash.prefix == token_hash.hex[:8]


def test_session_repr_does_not_carry_the_full_token_hash() -> None:
    token_hash = TokenHash.of(new_token())
    now = datetime.now(UTC)
    session = Session(str(uuid.uuid4()), "u", token_hash, now, now + timedelta(hours=1))
    assert token_hash.hex not in repr(session)


def test_new_token_has_prefix_256_random_bits_url_safe_and_checksum() -> None:
    token = new_token()
    assert token.startswith(TOKEN_PREFIX)
    body = token[len(TOKEN_PREFIX) :]
    assert URL_SAFE.fullmatch(body)
    decoded = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    assert TOKEN_BYTES * 8 >= 256
    assert len(decoded) >= TOKEN_BYTES  # 256 random bits (+ a CRC-32)
    assert is_well_formed(token)
    parse_token(token)  # and it passes the input check


def test_new_tokens_are_unique() -> None:
    tokens = {new_token() for _ in range(2000)}
    assert len(tokens) == 2000
    bodies = {t[len(TOKEN_PREFIX) : len(TOKEN_PREFIX) + 40] for t in tokens}
    assert len(bodies) == 2000


def _replace_char(token: str, index: int) -> str:
    old = token[index]
    new = "A" if old != "A" else "B"
    return token[:index] + new + token[index + 1 :]


@pytest.mark.parametrize("index", [len(TOKEN_PREFIX), len(TOKEN_PREFIX) + 20, -1])
def test_a_mistyped_token_fails_the_checksum(index: int) -> None:
    token = new_token()
    assert not is_well_formed(_replace_char(token, index % len(token)))


@pytest.mark.parametrize(
    "token",
    [
        "not-a-token",
        "sat_",
        "sat_" + "A" * 47,
        "sat_" + "A" * 49,
        "xyz_" + "A" * 48,
        "sat_" + "!" * 48,
    ],
)
def test_tokens_of_the_wrong_shape_are_not_well_formed(token: str) -> None:
    assert not is_well_formed(token)


def test_wrong_prefix_with_a_valid_body_is_not_well_formed() -> None:
    token = new_token()
    assert not is_well_formed("tok_" + token[len(TOKEN_PREFIX) :])


# --- user ids --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user_id", "problem"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("\t\n", "empty"),
        ("u" * (MAX_USER_ID_LENGTH + 1), "at most"),
        ("alice\x00", "control"),
        ("alice\nbob", "control"),
        ("alice\rbob", "control"),
        ("\x1b[31malice", "control"),
        ("alice\x7f", "control"),
    ],
)
def test_bad_user_id_is_invalid_argument(user_id: str, problem: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_user_id(user_id)
    assert info.value.field == "user_id"
    assert problem in info.value.problem


@pytest.mark.parametrize("user_id", ["alice\x85bob", "\x9b31malice"], ids=["NEL", "CSI"])
def test_user_id_with_c1_control_characters_is_invalid_argument(user_id: str) -> None:
    with pytest.raises(InvalidArgument):
        check_user_id(user_id)


@pytest.mark.parametrize(
    "user_id", ["alice", "u" * MAX_USER_ID_LENGTH, "renée@example.com", "user 42", "用户"]
)
def test_good_user_id_is_returned_unchanged(user_id: str) -> None:
    assert check_user_id(user_id) == user_id


# --- TTLs --------------------------------------------------------------------------


def test_ttl_none_means_the_default() -> None:
    assert check_ttl(None, DEFAULT_TTL, MAX_TTL) == DEFAULT_TTL


@pytest.mark.parametrize("ttl", [timedelta(minutes=1), MAX_TTL, timedelta(microseconds=1)])
def test_ttl_within_bounds_is_kept(ttl: timedelta) -> None:
    assert check_ttl(ttl, DEFAULT_TTL, MAX_TTL) == ttl


@pytest.mark.parametrize(
    ("ttl", "problem"),
    [
        (timedelta(0), "positive"),
        (timedelta(seconds=-1), "positive"),
        (MAX_TTL + timedelta(microseconds=1), "at most 2592000s"),
    ],
)
def test_ttl_out_of_bounds_is_invalid_argument(ttl: timedelta, problem: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_ttl(ttl, DEFAULT_TTL, MAX_TTL)
    assert info.value.field == "ttl"
    assert problem in info.value.problem


# --- metadata ------------------------------------------------------------------------


def test_metadata_at_the_limits_is_accepted_and_copied() -> None:
    metadata = {f"k{i}": "v" for i in range(MAX_METADATA_ENTRIES - 2)}
    metadata["k" * MAX_METADATA_KEY_BYTES] = "v" * MAX_METADATA_VALUE_BYTES
    metadata["é" * (MAX_METADATA_KEY_BYTES // 2)] = "ü" * (MAX_METADATA_VALUE_BYTES // 2)
    checked = check_metadata(metadata)
    assert checked == metadata
    assert checked is not metadata
    assert check_metadata({}) == {}


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        ({f"k{i}": "v" for i in range(MAX_METADATA_ENTRIES + 1)}, "entries"),
        ({"": "v"}, "empty"),
        ({"k" * (MAX_METADATA_KEY_BYTES + 1): "v"}, "keys must be at most"),
        ({"é" * (MAX_METADATA_KEY_BYTES // 2 + 1): "v"}, "keys must be at most"),  # bytes
        ({"k": "v" * (MAX_METADATA_VALUE_BYTES + 1)}, "values must be at most"),
        ({"k": "€" * (MAX_METADATA_VALUE_BYTES // 3 + 1)}, "values must be at most"),
        ({"k\x00": "v"}, "NUL"),
        ({"k": "v\x00"}, "NUL"),
    ],
)
def test_metadata_over_the_limits_is_invalid_argument(
    metadata: dict[str, str], problem: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_metadata(metadata)
    assert info.value.field == "metadata"
    assert problem in info.value.problem


# --- session ids -----------------------------------------------------------------------


def test_session_id_is_canonicalised() -> None:
    sid = uuid.uuid4()
    assert check_session_id(str(sid)) == str(sid)
    assert check_session_id(str(sid).upper()) == str(sid)
    assert check_session_id(sid.hex) == str(sid)


@pytest.mark.parametrize(
    ("session_id", "problem"),
    [
        ("", "empty"),
        ("not-a-uuid", "UUID"),
        ("1234", "UUID"),
        ("4bbe0035-7853-4f6e-b7f8-2923fbe06f830", "UUID"),  # a UUID and one digit more
        ("g" * 32, "UUID"),
    ],
)
def test_bad_session_id_is_invalid_argument(session_id: str, problem: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_session_id(session_id)
    assert info.value.field == "session_id"
    assert problem in info.value.problem


# --- verdicts --------------------------------------------------------------------------


def _session(expires_in: timedelta, revoked: bool = False) -> tuple[Session, datetime]:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    session = Session(
        session_id=str(uuid.uuid4()),
        user_id="u-" + uuid.uuid4().hex,
        token_hash=TokenHash.of(new_token()),
        created_at=now - timedelta(hours=1),
        expires_at=now + expires_in,
        revoked_at=now - timedelta(minutes=1) if revoked else None,
    )
    return session, now


@pytest.mark.parametrize(
    ("expires_in", "revoked", "expected"),
    [
        (timedelta(seconds=1), False, None),
        (timedelta(0), False, Reason.EXPIRED),  # expiry instant is already expired
        (timedelta(seconds=-1), False, Reason.EXPIRED),
        (timedelta(seconds=1), True, Reason.REVOKED),
        (timedelta(seconds=-1), True, Reason.REVOKED),  # revoked wins over expired
    ],
)
def test_session_verdict(expires_in: timedelta, revoked: bool, expected: Reason | None) -> None:
    session, now = _session(expires_in, revoked)
    assert session.verdict(now) is expected
