"""Properties of the gateway's masker, over generated texts that mix PII (valid by the
independent checks in ``tests.support.pii``) with filler that holds none: masking then
restoring gives the text back, no value survives any operator, placeholders are one
per value, masking masked text changes nothing, and a stream restored delta by delta
(any cut) is the original text."""

from __future__ import annotations

import datetime
import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from llmesh.pb.inference.v1 import inference_pb2
from llmesh.services.gateway.fields import StreamRestorer
from llmesh.services.gateway.masking import Masker, Operator, Vault
from tests.support.pii import luhn_complete, with_check

PROPERTY = settings(max_examples=100, deadline=None)

ENTITIES = ("cn_mobile", "cn_id", "bank_card", "email", "ipv4", "ipv6")
ALL_PSEUDONYMIZED = Masker(operators=dict.fromkeys(ENTITIES, Operator.PSEUDONYMIZE), hash_key=b"k")

# No digits, '@', '.', ':' or '<': filler can neither be PII nor join a value into a
# longer one, nor look like a placeholder.
filler = st.text(alphabet="你好世界请联系谢谢的是在我们 ，。！abcxyz", max_size=12).map(lambda s: f" {s} ")

mobiles = st.builds(
    lambda p, rest: f"1{p}{rest}", st.sampled_from("3456789"), st.text("0123456789", min_size=9, max_size=9)
)
birth_dates = st.dates(datetime.date(1930, 1, 1), datetime.date(2020, 12, 31)).map(lambda d: d.strftime("%Y%m%d"))
cn_ids = st.builds(
    lambda region, date, seq: with_check(f"{region}{date}{seq}"),
    st.sampled_from(["110101", "310104", "440305", "510107"]),
    birth_dates,
    st.text("0123456789", min_size=3, max_size=3),
)
cards = st.builds(lambda body: luhn_complete(f"6222{body}"), st.text("0123456789", min_size=11, max_size=11))
emails = st.builds(
    lambda user, host: f"{user}@{host}.com",
    st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8),
    st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8),
)
ipv4s = st.builds(lambda a, b, c, d: f"{a}.{b}.{c}.{d}", *(st.integers(1, 254) for _ in range(4)))
ipv6s = st.integers(2**125, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
STRATEGIES = {"cn_mobile": mobiles, "cn_id": cn_ids, "bank_card": cards, "email": emails, "ipv4": ipv4s, "ipv6": ipv6s}


def _tagged(entity: str, strategy: st.SearchStrategy[str]) -> st.SearchStrategy[tuple[str, str]]:
    return strategy.map(lambda v: (entity, v))


values = st.one_of(*(_tagged(e, s) for e, s in STRATEGIES.items()))


@st.composite
def texts(draw: st.DrawFn) -> tuple[str, list[tuple[str, str]]]:
    """A text and the (entity, value) pairs placed in it, between fillers."""
    pii = draw(st.lists(values, max_size=5))
    parts = [draw(filler)]
    for _, value in pii:
        parts += [value, draw(filler)]
    return "".join(parts), pii


@PROPERTY
@given(texts())
def test_every_value_is_found_as_its_entity(sample: tuple[str, list[tuple[str, str]]]) -> None:
    text, pii = sample
    assert [(f.entity, f.value) for f in ALL_PSEUDONYMIZED.find(text)] == pii


@PROPERTY
@given(texts())
def test_mask_then_restore_is_the_identity(sample: tuple[str, list[tuple[str, str]]]) -> None:
    text, _ = sample
    vault = Vault()
    masked, _ = ALL_PSEUDONYMIZED.mask(text, vault)
    assert vault.restore(masked) == text


@PROPERTY
@given(texts(), st.sampled_from(list(Operator)), st.booleans())
def test_no_value_survives_masking(sample: tuple[str, list[tuple[str, str]]], op: Operator, reversible: bool) -> None:
    text, pii = sample
    masker = Masker(operators=dict.fromkeys(ENTITIES, op), hash_key=b"k")
    masked, findings = masker.mask(text, Vault(), reversible=reversible)
    assert len(findings) == len(pii)
    for _, value in pii:
        assert value not in masked
    assert masker.find(masked) == []  # nothing in the result is (still) PII


@PROPERTY
@given(texts())
def test_placeholders_are_one_per_value(sample: tuple[str, list[tuple[str, str]]]) -> None:
    text, pii = sample
    vault = Vault()
    ALL_PSEUDONYMIZED.mask(text, vault)
    placeholders = {(e, v): vault.placeholder(e, v) for e, v in pii}  # already there: the same ones again
    assert len(vault) == len(placeholders)
    assert len(set(placeholders.values())) == len(placeholders)  # distinct values never share one
    for (e, v), ph in placeholders.items():
        assert vault.placeholder(e, v) == ph and vault.restore(ph) == v


@PROPERTY
@given(texts(), st.sampled_from(list(Operator)))
def test_masking_masked_text_changes_nothing(sample: tuple[str, list[tuple[str, str]]], op: Operator) -> None:
    text, _ = sample
    masker = Masker(operators=dict.fromkeys(ENTITIES, op), hash_key=b"k")
    vault = Vault()
    masked, _ = masker.mask(text, vault)
    assert masker.mask(masked, vault) == (masked, [])


@PROPERTY
@given(texts(), st.lists(st.integers(0, 400), max_size=6))
def test_a_stream_restores_across_any_cut(sample: tuple[str, list[tuple[str, str]]], cuts: list[int]) -> None:
    text, _ = sample
    vault = Vault()
    masked, _ = ALL_PSEUDONYMIZED.mask(text, vault)
    points = sorted({min(c, len(masked)) for c in cuts})
    deltas = [masked[a:b] for a, b in zip([0, *points], [*points, len(masked)], strict=True)]
    restorer = StreamRestorer(vault)
    out = []
    for delta in deltas:
        msg = inference_pb2.GenerateStreamResponse(text_delta=delta)
        restorer.restore(msg)
        out.append(msg.text_delta)
    tail = restorer.tail(inference_pb2.GenerateStreamResponse)
    if tail is not None:
        out.append(tail.text_delta)  # type: ignore[attr-defined]  # a GenerateStreamResponse
    assert "".join(out) == text
