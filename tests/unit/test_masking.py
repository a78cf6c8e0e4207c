"""PII masking: detection tables (positive and negative), operators, vault round trip."""

from __future__ import annotations

import re
from typing import Any

import pytest

from llmesh.services.gateway.masking import Finding, Masker, Operator, Rule, Vault
from tests.support.pii import (
    BAD_DATE_ID,
    BAD_ID,
    BAD_REGION_ID,
    CARD_16,
    CARD_19,
    ID_1,
    ID_X,
    NEGATIVE,
    ORDER_NO,
    POSITIVE,
    id_check,
    luhn,
    with_check,
)


def test_fixtures_are_what_the_cases_claim() -> None:
    assert ID_1 == "110101199003074573" and id_check(ID_X[:17]) == "X"
    assert luhn(CARD_16) and luhn(CARD_19) and len(CARD_19) == 19
    # Negatives must fail every check, or they would (rightly) be found as another entity.
    for s in (ORDER_NO, BAD_ID, BAD_DATE_ID, BAD_REGION_ID, "4111111111111112"):
        assert not luhn(s), s


@pytest.fixture(scope="module")
def masker() -> Masker:
    return Masker(hash_key=b"test-key")


@pytest.mark.parametrize(("entity", "text", "value"), POSITIVE)
def test_positive(masker: Masker, entity: str, text: str, value: str) -> None:
    (f,) = masker.find(text)
    assert (f.entity, f.value, text[f.start : f.end]) == (entity, value, value)


@pytest.mark.parametrize("text", NEGATIVE)
def test_negative_untouched(masker: Masker, text: str) -> None:
    assert masker.find(text) == []
    assert masker.mask(text, Vault()) == (text, [])


MASK_CASES = [
    ("13812348000", "138****8000"),
    ("+86 138 1234 8000", "+86 138 **** 8000"),
    (ID_1, "110101********4573"),
    (ID_X, "110105********002X"),
    (CARD_16, "************1111"),
    ("4111 1111 1111 1111", "**** **** **** 1111"),
    ("zhang@example.com", "z***@example.com"),
    ("192.168.1.10", "192.168.*.*"),
    ("2001:db8::1", "2001:db8:*:*:*:*:*:*"),
]


@pytest.mark.parametrize(("value", "masked"), MASK_CASES)
def test_mask_operator(value: str, masked: str) -> None:
    m = Masker(operators=dict.fromkeys(("cn_mobile", "cn_id", "bank_card", "email"), Operator.MASK))
    assert m.mask(f"x {value} y")[0] == f"x {masked} y"


def test_redact_operator() -> None:
    m = Masker(operators={"cn_mobile": Operator.REDACT, "cn_id": "redact", "ip": Operator.REDACT})  # type: ignore[dict-item]
    text = f"手机13812348000,身份证{ID_1},ip 10.0.0.1 / ::1"
    assert m.mask(text)[0] == "手机[CN_MOBILE],身份证[CN_ID],ip [IPV4] / [IPV6]"


def test_hash_operator_is_keyed_and_stable() -> None:
    ops = {"cn_mobile": Operator.HASH}
    a, b = Masker(operators=ops, hash_key=b"k1"), Masker(operators=ops, hash_key=b"k1")
    out, _ = a.mask("call 13812348000")
    assert re.fullmatch(r"call <CN_MOBILE:[0-9a-f]{12}>", out)
    assert b.mask("call 13812348000")[0] == out  # same key + value
    assert a.mask("call +86 138-1234-8000")[0] == out  # same number, other spelling
    assert a.mask("call 13912348000")[0] != out
    assert Masker(operators=ops, hash_key=b"k2").mask("call 13812348000")[0] != out
    # No key: a random one, so hashes of a tiny number space cannot be precomputed.
    assert Masker(operators=ops).mask("call 13812348000")[0] != Masker(operators=ops).mask("call 13812348000")[0]


def test_default_operators(masker: Masker) -> None:
    text = f"张三 13812348000 {ID_1} {CARD_16} z@example.com 10.1.2.3"
    out, _ = masker.mask(text, Vault())
    assert out == "张三 <PHONE_1> <ID_1> <CARD_1> <EMAIL_1> 10.1.*.*"


def test_pseudonymize_numbering_and_stability(masker: Masker) -> None:
    vault = Vault()
    out, _ = masker.mask("13812348000, 13912345678, 13812348000, 138-1234-8000, a@x.com", vault)
    assert out == "<PHONE_1>, <PHONE_2>, <PHONE_1>, <PHONE_1>, <EMAIL_1>"
    # Stable across calls with the same vault (a conversation); a new vault starts over.
    assert masker.mask("again 13912345678", vault)[0] == "again <PHONE_2>"
    assert masker.mask("new 13912345678", Vault())[0] == "new <PHONE_1>"
    assert vault.placeholder("cn_mobile", "13912345678") == "<PHONE_2>"
    assert len(vault) == 3


def test_vault_round_trip_through_llm_output(masker: Masker) -> None:
    vault = Vault()
    prompt = f"请联系张三,手机13812348000,身份证{ID_1},邮箱 zhang.san@example.com, card {CARD_16}"
    masked, findings = masker.mask(prompt, vault)
    assert [f.value for f in findings] == ["13812348000", ID_1, "zhang.san@example.com", CARD_16]
    for f in findings:
        assert f.value not in masked
    assert vault.restore(masked) == prompt
    llm = "好的,我会拨打<PHONE_1>联系。核对身份证 < id_1 > 与<ID_1>;<PHONE_1>再确认。<PHONE_7> <NAME_1> <EMAIL_1>"
    assert vault.restore(llm) == (
        f"好的,我会拨打13812348000联系。核对身份证 {ID_1} 与{ID_1};13812348000再确认。<PHONE_7> <NAME_1> zhang.san@example.com"
    )


def test_restore_is_single_pass() -> None:
    vault = Vault()
    vault.placeholder("note", "<NOTE_1>")  # a value that looks like its own placeholder
    assert vault.restore("<NOTE_1>") == "<NOTE_1>" and Vault().restore("<NOTE_1>") == "<NOTE_1>"


def test_not_reversible_falls_back_to_mask(masker: Masker) -> None:
    vault = Vault()
    out, _ = masker.mask(f"13812348000 {ID_1}", vault, reversible=False)
    assert out == "138****8000 110101********4573" and len(vault) == 0


def test_no_vault_still_consistent_within_text(masker: Masker) -> None:
    assert masker.mask("13812348000 / 13812348000")[0] == "<PHONE_1> / <PHONE_1>"


OVERLAPS = [
    ("email containing a mobile", "mail 13812348000@163.com", "email", "13812348000@163.com"),
    ("ipv4 inside ipv6", "addr ::ffff:192.168.1.1", "ipv6", "::ffff:192.168.1.1"),
    ("separated tail is not part of card", "4111 1111 1111 1111 123", "bank_card", "4111 1111 1111 1111"),
]


@pytest.mark.parametrize(("case", "text", "entity", "value"), OVERLAPS, ids=[c[0] for c in OVERLAPS])
def test_overlap_longest_validated_wins(masker: Masker, case: str, text: str, entity: str, value: str) -> None:
    assert [(f.entity, f.value) for f in masker.find(text)] == [(entity, value)]


def test_id_that_also_passes_luhn_is_an_id(masker: Masker) -> None:
    both = next(s for s in (with_check(f"11010119900307{n:03d}") for n in range(1000)) if s[-1] != "X" and luhn(s))
    assert [f.entity for f in masker.find(f"号码{both}")] == ["cn_id"]


def test_find_sorted_and_disjoint(masker: Masker) -> None:
    text = f"a@b.cn {ID_1} 13812348000 {CARD_16} 10.0.0.1 13812348000@qq.com fe80::1"
    found = masker.find(text)
    assert [f.entity for f in found] == ["email", "cn_id", "cn_mobile", "bank_card", "ipv4", "email", "ipv6"]
    assert all(a.end <= b.start for a, b in zip(found, found[1:], strict=False))


def test_operator_defined_rule() -> None:
    m = Masker(
        rules=[
            Rule("employee_id", r"EMP-\d{11}", Operator.REDACT),
            Rule("ticket", r"TK[0-9]{6}", Operator.PSEUDONYMIZE),
            Rule("project", r"P-[A-Z]{4}", Operator.MASK),
        ]
    )
    vault = Vault()
    out, findings = m.mask("工号EMP-13812348000, 工单TK123456 TK123456, P-ABCD", vault)
    # The rule's match is longer than the mobile number inside it, so it wins.
    assert out == "工号[EMPLOYEE_ID], 工单<TICKET_1> <TICKET_1>, P-***D"
    assert [f.entity for f in findings] == ["employee_id", "ticket", "ticket", "project"]
    assert vault.restore("see <TICKET_1>") == "see TK123456"
    overridden = Masker(
        rules=[Rule("ticket", r"TK[0-9]{6}", Operator.PSEUDONYMIZE)], operators={"ticket": Operator.REDACT}
    )
    assert overridden.mask("TK123456")[0] == "[TICKET]"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"operators": {"cn_phone": Operator.MASK}},  # typo must not silently keep the default
        {"rules": [Rule("Bad Name", "x", Operator.MASK)]},
        {"rules": [Rule("email", "x", Operator.MASK)]},  # shadows a built-in
        {"rules": [Rule("broken", "(", Operator.MASK)]},
    ],
)
def test_bad_configuration_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Masker(**kwargs)


def test_empty_rule_matches_are_ignored() -> None:
    assert Masker(rules=[Rule("maybe", r"x*", Operator.REDACT)]).find("abc") == []


def test_summary_has_counts_only(masker: Masker) -> None:
    vault = Vault()
    _, findings = masker.mask(f"13812348000 13912345678 {ID_1} a@example.com", vault)
    summary = masker.summary(findings)
    assert summary == {"cn_mobile": 2, "cn_id": 1, "email": 1}
    for raw in ("13812348000", "13912345678", ID_1, "a@example.com"):
        assert raw not in repr(summary) and raw not in repr(findings) and raw not in repr(vault)
    assert masker.summary([]) == {}


MIXED = (
    f"请联系张三,手机13812348000,身份证{ID_1},卡号 4111 1111 1111 1111, "
    "mail zhang.san@example.com, server 192.168.1.10 and 2001:db8::1, +86 139-1234-5678, 工单TK123456"
)


@pytest.mark.parametrize("op", list(Operator))
def test_idempotent(op: Operator) -> None:
    m = Masker(
        operators=dict.fromkeys(("cn_mobile", "cn_id", "bank_card", "email", "ip"), op),
        rules=[Rule("ticket", r"TK[0-9]{6}", op)],
        hash_key=b"k",
    )
    vault = Vault()
    once, findings = m.mask(MIXED, vault)
    assert len(findings) == 8
    twice, again = m.mask(once, vault)
    assert (twice, again) == (once, [])


def test_finding_is_frozen() -> None:
    f = Finding("email", 0, 3, "a@b")
    with pytest.raises(AttributeError):
        f.start = 1  # type: ignore[misc]


def test_placeholders_split_across_stream_deltas_are_restored(masker: Masker) -> None:
    from llmesh.pb.inference.v1 import inference_pb2 as ipb
    from llmesh.services.gateway.fields import StreamRestorer

    vault = Vault()
    masked, _ = masker.mask("call 13812348000 or mail a.b@example.com", vault, reversible=True)
    assert "<PHONE_1>" in masked and "<EMAIL_1>" in masked
    restorer = StreamRestorer(vault)
    deltas = ["Sure: <PHO", "NE_1", "> then < email_", "1> ok <", "b>", " 5 < 7", " <PHONE_"]
    out = []
    for d in deltas:
        msg = ipb.GenerateStreamResponse(text_delta=d)
        restorer.restore(msg)
        out.append(msg.text_delta)
    assert out[0] == "Sure: " and out[1] == ""  # held back until the placeholder completes
    last = restorer.tail(ipb.GenerateStreamResponse)
    assert (
        isinstance(last, ipb.GenerateStreamResponse) and last.text_delta == "<PHONE_"
    )  # unfinished at the end: as written
    assert "".join(out) + last.text_delta == "Sure: 13812348000 then a.b@example.com ok <b> 5 < 7 <PHONE_"
    assert restorer.tail(ipb.GenerateStreamResponse) is None
