"""HMAC-SHA256 request signatures, shared by the client SDK (``sign``) and the gateway
(``verify`` + ``nonce_key``).

Wire format (gRPC metadata, all ASCII):

    x-llmesh-key-id     the id of the shared secret (``[A-Za-z0-9._:-]{1,128}``)
    x-llmesh-timestamp  unix seconds, decimal integer
    x-llmesh-nonce      >= 16 random bytes, url-safe base64 without padding (22..64 chars)
    x-llmesh-signature  lowercase hex HMAC-SHA256 (64 chars) of the canonical string

Canonical string (UTF-8)::

    "v1\\n" + full_method + "\\n" + timestamp + "\\n" + nonce + "\\n" + sha256_hex(body)

``full_method`` is the gRPC path (``/llmesh.inference.v1.Inference/Generate``); the
gateway takes it from the call, never from the client. ``body`` is the serialized
request message. The key id is not in the canonical string: it selects the secret, so
changing it changes the key and breaks the signature anyway. ``sign`` adds the key-id
header only when given ``key_id=`` (callers may add it themselves); each of the four
headers must appear exactly once (a duplicate is refused as ambiguous).

Streams (documented limitation): gRPC sends the call's metadata before the first
message, so a signature can only cover ONE message. For client-streaming and bidi
calls the signature covers the FIRST request message only (the SDK peeks the request
iterator before starting the call; a stream with no message signs ``b""``). The gateway
defers verification until the first message has arrived and forwards nothing before
that. Later messages on the stream are NOT covered: their integrity rests on TLS and on
the call being bound to the verified first message (same HTTP/2 stream). Unary and
server-streaming calls are fully covered (their single request is signed).

Replay protection: a timestamp outside +-``skew_s`` is refused (stale or future), and
inside the window each (key id, nonce) may be used once: the gateway does
``SET llmesh:nonce:<key_id>:<nonce> 1 NX EX <2*skew_s>`` (``nonce_key``; in the same
Redis script as the rate limit, see ``gateway/ratelimit.py``); a second claim fails
and the gateway refuses with ``Unauthenticated("replayed nonce")``.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from llmesh.runtime.errors import Unauthenticated

VERSION = "v1"
HEADER_KEY_ID = "x-llmesh-key-id"
HEADER_TIMESTAMP = "x-llmesh-timestamp"
HEADER_NONCE = "x-llmesh-nonce"
HEADER_SIGNATURE = "x-llmesh-signature"
HEADERS = (HEADER_KEY_ID, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE)

DEFAULT_SKEW_S = 300.0
NONCE_BYTES = 16
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{22,64}")  # 16 bytes -> 22 chars of url-safe base64
_KEY_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")
_SIGNATURE_RE = re.compile(r"[0-9a-fA-F]{64}")

MetadataLike = Mapping[str, str | bytes] | Iterable[tuple[str, str | bytes]]


@dataclass(frozen=True)
class SignedRequest:
    key_id: str
    timestamp: int
    nonce: str


def new_nonce() -> str:
    """16 random bytes, url-safe base64 without padding (22 chars)."""
    return secrets.token_urlsafe(NONCE_BYTES)


def canonical_string(method: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    return "\n".join((VERSION, method, timestamp, nonce, hashlib.sha256(body).hexdigest())).encode("utf-8")


def _mac(secret: bytes, method: str, timestamp: str, nonce: str, body: bytes) -> str:
    return hmac.new(secret, canonical_string(method, timestamp, nonce, body), hashlib.sha256).hexdigest()


def sign(
    secret: bytes,
    method: str,
    body: bytes,
    *,
    now: float | None = None,
    nonce: str | None = None,
    key_id: str | None = None,
) -> list[tuple[str, str]]:
    """Metadata pairs that authenticate one call of ``method`` whose (first) request
    message serializes to ``body``: timestamp, nonce and signature, plus
    ``x-llmesh-key-id`` when ``key_id`` is given (otherwise the caller adds that header
    itself, exactly once). Append them to the call's metadata."""
    if not secret:
        raise ValueError("empty signing secret")
    if key_id is not None and not _KEY_ID_RE.fullmatch(key_id):
        raise ValueError("key_id must match [A-Za-z0-9._:-]{1,128}")
    nonce = new_nonce() if nonce is None else nonce
    if not _NONCE_RE.fullmatch(nonce):
        raise ValueError("nonce must be 22..64 chars of url-safe base64 (>= 16 random bytes)")
    timestamp = str(int(time.time() if now is None else now))
    pairs = [(HEADER_KEY_ID, key_id)] if key_id is not None else []
    return pairs + [
        (HEADER_TIMESTAMP, timestamp),
        (HEADER_NONCE, nonce),
        (HEADER_SIGNATURE, _mac(secret, method, timestamp, nonce, body)),
    ]


def _as_dict(metadata: MetadataLike) -> dict[str, str]:
    items = metadata.items() if isinstance(metadata, Mapping) else metadata
    out: dict[str, str] = {}
    for k, v in items:
        k = k.lower()
        if k in HEADERS:
            if k in out:  # ambiguous: which one would a proxy in front of us have used?
                raise Unauthenticated(f"duplicate {k} metadata")
            out[k] = v.decode("ascii", "replace") if isinstance(v, bytes) else str(v)
    return out


def key_id_of(metadata: MetadataLike) -> str:
    """The (format-checked) key id, so the gateway can look up the secret before ``verify``."""
    md = _as_dict(metadata)
    key_id = md.get(HEADER_KEY_ID)
    if key_id is None:
        raise Unauthenticated(f"missing {HEADER_KEY_ID} metadata")
    if not _KEY_ID_RE.fullmatch(key_id):
        raise Unauthenticated(f"malformed {HEADER_KEY_ID}")
    return key_id


def verify(
    secret: bytes,
    method: str,
    body: bytes,
    metadata: MetadataLike,
    *,
    now: float | None = None,
    skew_s: float = DEFAULT_SKEW_S,
) -> SignedRequest:
    """Check the signature headers of one call; raises ``Unauthenticated`` naming what is
    wrong (never echoing the signature). Nonce uniqueness is NOT checked here: claim the
    returned nonce (key ``nonce_key``, ttl ``nonce_ttl(skew_s)``) once."""
    md = _as_dict(metadata)
    for header in HEADERS:
        if not md.get(header):
            raise Unauthenticated(f"missing {header} metadata")
    key_id, ts_text, nonce, signature = (md[h] for h in HEADERS)
    if not _KEY_ID_RE.fullmatch(key_id):
        raise Unauthenticated(f"malformed {HEADER_KEY_ID}")
    if not _TIMESTAMP_RE.fullmatch(ts_text):
        raise Unauthenticated(f"bad {HEADER_TIMESTAMP}: expected unix seconds as a decimal integer")
    if not _NONCE_RE.fullmatch(nonce):
        raise Unauthenticated(f"malformed {HEADER_NONCE}: expected 22..64 chars of url-safe base64")
    if not _SIGNATURE_RE.fullmatch(signature):
        raise Unauthenticated(f"bad signature: {HEADER_SIGNATURE} must be 64 hex chars")
    timestamp = int(ts_text)
    now = time.time() if now is None else now
    if timestamp < now - skew_s:
        raise Unauthenticated(f"stale request: timestamp is {now - timestamp:.0f}s old (allowed skew {skew_s:g}s)")
    if timestamp > now + skew_s:
        raise Unauthenticated(f"request timestamp is {timestamp - now:.0f}s in the future (allowed skew {skew_s:g}s)")
    expected = _mac(secret, method, ts_text, nonce, body)
    if not hmac.compare_digest(expected, signature.lower()):
        raise Unauthenticated("bad signature")
    return SignedRequest(key_id=key_id, timestamp=timestamp, nonce=nonce)


def nonce_ttl(skew_s: float = DEFAULT_SKEW_S) -> int:
    """How long a nonce must be remembered: the whole window a timestamp is accepted in."""
    return max(1, math.ceil(2 * skew_s))


def nonce_key(key_id: str, nonce: str) -> str:
    """The Redis key under which a nonce is claimed (the gateway's rate-limit script does
    ``SET <key> 1 NX EX nonce_ttl(skew_s)``, in the same round trip as the rate limit)."""
    return f"llmesh:nonce:{key_id}:{nonce}"
