"""HMAC request signatures: sign/verify round trip and every refusal (single-use nonces
are claimed by the rate limiter's script: tests/unit/test_ratelimit.py)."""

from __future__ import annotations

import pytest

from llmesh.auth import signature as sig
from llmesh.runtime.errors import Unauthenticated

SECRET = b"s3cr3t-shared-key-for-tests-0123456789"
METHOD = "/llmesh.inference.v1.Inference/Generate"
BODY = b"\x0a\x05hello"
NOW = 1_700_000_000.0


def signed(**kw: object) -> dict[str, str]:
    return dict(sig.sign(SECRET, METHOD, BODY, now=NOW, key_id="k1", **kw))  # type: ignore[arg-type]


def refusal(md: object, *, secret: bytes = SECRET, method: str = METHOD, body: bytes = BODY, now: float = NOW) -> str:
    with pytest.raises(Unauthenticated) as e:
        sig.verify(secret, method, body, md, now=now)  # type: ignore[arg-type]
    return e.value.message


def test_round_trip() -> None:
    md = signed()
    assert set(md) == set(sig.HEADERS)
    assert md[sig.HEADER_TIMESTAMP] == str(int(NOW))
    assert len(md[sig.HEADER_SIGNATURE]) == 64
    assert len(md[sig.HEADER_NONCE]) >= 22
    req = sig.verify(SECRET, METHOD, BODY, md, now=NOW + 10)
    assert req == sig.SignedRequest(key_id="k1", timestamp=int(NOW), nonce=md[sig.HEADER_NONCE])


def test_accepts_grpc_metadata_shapes() -> None:
    # the caller may add the key id header itself (sign() then leaves it out)
    pairs = [("user-agent", "x"), ("x-llmesh-key-id", "k9"), *sig.sign(SECRET, METHOD, BODY, now=NOW)]
    assert sig.verify(SECRET, METHOD, BODY, pairs, now=NOW).key_id == "k9"
    as_bytes = [(k, v.encode()) for k, v in pairs]
    assert sig.verify(SECRET, METHOD, BODY, as_bytes, now=NOW).key_id == "k9"
    assert sig.key_id_of(pairs) == "k9"
    assert sig.HEADER_KEY_ID not in dict(sig.sign(SECRET, METHOD, BODY))


def test_duplicate_headers_refused() -> None:
    pairs = [("x-llmesh-key-id", "k9"), *sig.sign(SECRET, METHOD, BODY, now=NOW, key_id="k1")]
    with pytest.raises(Unauthenticated, match="duplicate x-llmesh-key-id"):
        sig.verify(SECRET, METHOD, BODY, pairs, now=NOW)
    with pytest.raises(Unauthenticated, match="duplicate"):
        sig.key_id_of(pairs)


def test_canonical_string_is_documented_format() -> None:
    import hashlib
    import hmac

    md = signed(nonce="A" * 22)
    canon = f"v1\n{METHOD}\n{int(NOW)}\n{'A' * 22}\n{hashlib.sha256(BODY).hexdigest()}".encode()
    assert md[sig.HEADER_SIGNATURE] == hmac.new(SECRET, canon, hashlib.sha256).hexdigest()


def test_nonces_are_random() -> None:
    assert len({signed()[sig.HEADER_NONCE] for _ in range(100)}) == 100


@pytest.mark.parametrize("header", sig.HEADERS)
def test_missing_header_is_named(header: str) -> None:
    md = signed()
    del md[header]
    assert refusal(md) == f"missing {header} metadata"


@pytest.mark.parametrize("ts", ["17e8", "-5", "1700000000.5", "abc", " 1700000000", "9" * 13])
def test_bad_timestamp_format(ts: str) -> None:
    md = signed()
    md[sig.HEADER_TIMESTAMP] = ts
    assert "bad x-llmesh-timestamp" in refusal(md)


def test_stale_and_future_timestamps() -> None:
    md = signed()
    assert "stale request" in refusal(md, now=NOW + 301)
    assert "in the future" in refusal(md, now=NOW - 301)
    sig.verify(SECRET, METHOD, BODY, md, now=NOW + 299)
    sig.verify(SECRET, METHOD, BODY, md, now=NOW - 299)
    with pytest.raises(Unauthenticated, match="stale"):
        sig.verify(SECRET, METHOD, BODY, md, now=NOW + 11, skew_s=10)


@pytest.mark.parametrize("nonce", ["short", "A" * 65, "A" * 21, "has space" + "A" * 20, "a+b/" * 6, "A" * 22 + "=="])
def test_malformed_nonce(nonce: str) -> None:
    md = signed()
    md[sig.HEADER_NONCE] = nonce
    assert "malformed x-llmesh-nonce" in refusal(md)
    with pytest.raises(ValueError):
        sig.sign(SECRET, METHOD, BODY, nonce=nonce)


def test_bad_signature_cases() -> None:
    md = signed()
    assert refusal(md, secret=b"other-secret") == "bad signature"
    assert refusal(md, method="/llmesh.inference.v1.Inference/Embed") == "bad signature"
    assert refusal(md, body=BODY + b"\x00") == "bad signature"
    for header, value in [(sig.HEADER_NONCE, "B" * 22), (sig.HEADER_TIMESTAMP, str(int(NOW) + 1))]:
        tampered = dict(md, **{header: value})
        assert refusal(tampered) == "bad signature"
    flipped = md[sig.HEADER_SIGNATURE][:-1] + ("0" if md[sig.HEADER_SIGNATURE][-1] != "0" else "1")
    assert refusal(dict(md, **{sig.HEADER_SIGNATURE: flipped})) == "bad signature"
    assert "must be 64 hex chars" in refusal(dict(md, **{sig.HEADER_SIGNATURE: "zz" * 32}))
    # upper-case hex is the same signature
    sig.verify(SECRET, METHOD, BODY, dict(md, **{sig.HEADER_SIGNATURE: md[sig.HEADER_SIGNATURE].upper()}), now=NOW)


def test_malformed_key_id() -> None:
    md = signed()
    md[sig.HEADER_KEY_ID] = "bad key\n"
    assert refusal(md) == "malformed x-llmesh-key-id"
    with pytest.raises(Unauthenticated, match="malformed"):
        sig.key_id_of(md)
    with pytest.raises(Unauthenticated, match="missing x-llmesh-key-id"):
        sig.key_id_of({})


def test_empty_body_stream_signs_empty() -> None:
    md = dict(sig.sign(SECRET, METHOD, b"", now=NOW, key_id="k1"))
    sig.verify(SECRET, METHOD, b"", md, now=NOW)


def test_nonce_ttl() -> None:
    assert sig.nonce_ttl(300) == 600
    assert sig.nonce_ttl(0.2) == 1


def test_nonce_key_is_per_key_id() -> None:
    assert sig.nonce_key("k1", "n") != sig.nonce_key("k2", "n")
