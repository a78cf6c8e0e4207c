"""Properties of the request signature (``llmesh.auth.signature``): what ``sign``
produces ``verify`` accepts for any method, body, key and surrounding metadata (in any
order, any header case, str or bytes values), and any single change of the body, the
method, the timestamp, the nonce, the signature or the secret is refused."""

from __future__ import annotations

import string

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from llmesh.auth.signature import (
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    HEADERS,
    SignedRequest,
    sign,
    verify,
)
from llmesh.runtime.errors import Unauthenticated

PROPERTY = settings(max_examples=100, deadline=None)
NOW = 1_700_000_000.0
SKEW_S = 300.0
NONCE_CHARS = string.ascii_letters + string.digits + "-_"

secrets_ = st.binary(min_size=1, max_size=64)
methods = st.builds(
    lambda s, m: f"/{s}/{m}",
    st.text(string.ascii_letters + string.digits + "._", min_size=1, max_size=40),
    st.text(string.ascii_letters + string.digits, min_size=1, max_size=20),
) | st.text(min_size=1, max_size=60)  # the canonical string takes any text, not only gRPC paths
bodies = st.binary(max_size=512)
key_ids = st.text(string.ascii_letters + string.digits + "._:-", min_size=1, max_size=128)
nonces = st.text(NONCE_CHARS, min_size=22, max_size=64)
offsets = st.floats(-SKEW_S + 1, SKEW_S - 1)  # the client's clock against the gateway's
others = st.lists(
    st.tuples(st.sampled_from(["authorization", "x-custom", "x-request-id"]), st.text(string.printable, max_size=20)),
    max_size=4,
)


@st.composite
def signed_calls(draw: st.DrawFn) -> tuple[bytes, str, bytes, list[tuple[str, str | bytes]], SignedRequest]:
    """A signed call (secret, method, body, metadata as the gateway would see it) and
    what ``verify`` must return for it."""
    secret, method, body = draw(secrets_), draw(methods), draw(bodies)
    key_id, nonce, offset = draw(key_ids), draw(nonces), draw(offsets)
    pairs: list[tuple[str, str | bytes]] = list(
        sign(secret, method, body, now=NOW + offset, nonce=nonce, key_id=key_id)
    )
    if draw(st.booleans()):  # header names arrive in any case, values as str or bytes
        pairs = [
            (k.upper() if draw(st.booleans()) else k, v.encode() if isinstance(v, str) and draw(st.booleans()) else v)
            for k, v in pairs
        ]
    md = draw(st.permutations([*pairs, *draw(others)]))
    return secret, method, body, md, SignedRequest(key_id, int(NOW + offset), nonce)


def _with(md: list[tuple[str, str | bytes]], header: str, value: str) -> list[tuple[str, str | bytes]]:
    return [(k, value if k.lower() == header else v) for k, v in md]


def _value(md: list[tuple[str, str | bytes]], header: str) -> str:
    v = next(v for k, v in md if k.lower() == header)
    return v.decode() if isinstance(v, bytes) else v


def _refused(secret: bytes, method: str, body: bytes, md: list[tuple[str, str | bytes]]) -> None:
    with pytest.raises(Unauthenticated) as e:
        verify(secret, method, body, md, now=NOW, skew_s=SKEW_S)
    assert e.value.code.name == "UNAUTHENTICATED"


@PROPERTY
@given(signed_calls())
def test_sign_then_verify_round_trips(
    call: tuple[bytes, str, bytes, list[tuple[str, str | bytes]], SignedRequest],
) -> None:
    secret, method, body, md, expected = call
    assert verify(secret, method, body, md, now=NOW, skew_s=SKEW_S) == expected


@PROPERTY
@given(signed_calls(), st.data())
def test_any_byte_of_the_body_changed_is_refused(call, data: st.DataObject) -> None:
    secret, method, body, md, _ = call
    if body:
        i = data.draw(st.integers(0, len(body) - 1))
        byte = data.draw(st.integers(0, 255).filter(lambda b: b != body[i]))
        changed = body[:i] + bytes([byte]) + body[i + 1 :]
    else:
        changed = data.draw(st.binary(min_size=1, max_size=4))  # an empty body signed, a non-empty one sent
    _refused(secret, method, changed, md)


@PROPERTY
@given(signed_calls(), st.data())
def test_any_character_of_the_method_changed_is_refused(call, data: st.DataObject) -> None:
    secret, method, body, md, _ = call
    i = data.draw(st.integers(0, len(method) - 1))
    c = data.draw(st.characters(codec="utf-8").filter(lambda c: c != method[i]))
    _refused(secret, method[:i] + c + method[i + 1 :], body, md)


@PROPERTY
@given(signed_calls(), offsets)
def test_another_timestamp_is_refused(call, offset: float) -> None:
    secret, method, body, md, signed = call
    other = str(int(NOW + offset))
    assume(int(other) != signed.timestamp)
    _refused(secret, method, body, _with(md, HEADER_TIMESTAMP, other))


@PROPERTY
@given(signed_calls(), st.data())
def test_any_character_of_the_nonce_changed_is_refused(call, data: st.DataObject) -> None:
    secret, method, body, md, signed = call
    i = data.draw(st.integers(0, len(signed.nonce) - 1))
    c = data.draw(st.sampled_from(NONCE_CHARS).filter(lambda c: c != signed.nonce[i]))
    _refused(secret, method, body, _with(md, HEADER_NONCE, signed.nonce[:i] + c + signed.nonce[i + 1 :]))


@PROPERTY
@given(signed_calls(), st.data())
def test_any_digit_of_the_signature_changed_is_refused(call, data: st.DataObject) -> None:
    secret, method, body, md, _ = call
    signature = _value(md, HEADER_SIGNATURE)
    i = data.draw(st.integers(0, len(signature) - 1))
    c = data.draw(st.sampled_from("0123456789abcdef").filter(lambda c: c != signature[i]))
    _refused(secret, method, body, _with(md, HEADER_SIGNATURE, signature[:i] + c + signature[i + 1 :]))


@PROPERTY
@given(signed_calls(), secrets_)
def test_another_secret_is_refused(call, other: bytes) -> None:
    secret, method, body, md, _ = call
    assume(other != secret)
    _refused(other, method, body, md)


@PROPERTY
@given(signed_calls(), st.sampled_from(HEADERS))
def test_a_duplicated_or_missing_header_is_refused(call, header: str) -> None:
    secret, method, body, md, _ = call
    (pair,) = [(k, v) for k, v in md if k.lower() == header]
    _refused(secret, method, body, [*md, pair])  # the same header twice is ambiguous
    _refused(secret, method, body, [(k, v) for k, v in md if k.lower() != header])
