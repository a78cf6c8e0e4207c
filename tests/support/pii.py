"""PII test data shared by the masker's tests and the published-rules test: values
built with independent re-implementations of the checks (so the tests do not trust the
module's own), and detection tables (positive: one entity each; negative: nothing)."""

from __future__ import annotations

ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


# Independent re-implementations, so the tests do not trust the module's own checks.
def id_check(first17: str) -> str:
    return "10X98765432"[sum(int(c) * w for c, w in zip(first17, ID_WEIGHTS, strict=True)) % 11]


def with_check(first17: str) -> str:
    return first17 + id_check(first17)


def wrong_check(first17: str) -> str:
    return first17 + next(c for c in "0123456789X" if c != id_check(first17))


def luhn(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def luhn_complete(prefix: str) -> str:
    return next(prefix + c for c in "0123456789" if luhn(prefix + c))


ID_1 = with_check("11010119900307457")  # 110101199003074573
ID_X = "11010519491231002X"  # the standard's own worked example
CARD_16 = "4111111111111111"
CARD_19 = luhn_complete("622202123456789012")
ORDER_NO = "2023110512345678"
BAD_ID = wrong_check("11010119900307457")
BAD_DATE_ID = with_check("11010119900230457")  # Feb 30
BAD_REGION_ID = with_check("91010119900307457")  # region codes start 1-8


# (entity, text, the value found)
POSITIVE = [
    ("cn_mobile", "请联系张三,手机13812348000,谢谢", "13812348000"),
    ("cn_mobile", "tel +86 138 1234 8000 (office)", "+86 138 1234 8000"),
    ("cn_mobile", "电话:0086-139-1234-5678。", "0086-139-1234-5678"),
    ("cn_mobile", "拨打8615912345678", "8615912345678"),
    ("cn_mobile", "手机１３８１２３４８０００", "１３８１２３４８０００"),  # full-width digits
    ("cn_id", f"身份证{ID_1}号", ID_1),
    ("cn_id", f"ID: {ID_X}.", ID_X),
    ("cn_id", f"id {ID_X.lower()} ok", ID_X.lower()),
    ("cn_id", "证件 110101 19900307 4573", "110101 19900307 4573"),
    ("bank_card", f"卡号{CARD_16}", CARD_16),
    ("bank_card", "card 4111 1111 1111 1111 exp 12/29", "4111 1111 1111 1111"),
    ("bank_card", "card 4111-1111-1111-1111", "4111-1111-1111-1111"),
    ("bank_card", f"银行卡:{CARD_19}", CARD_19),
    ("bank_card", "card 4111 1111 1111 1111 12 installments", "4111 1111 1111 1111"),
    ("email", "邮箱zhang.san@example.com谢谢", "zhang.san@example.com"),
    ("email", "Contact: John.Doe+news@mail.example.co.uk.", "John.Doe+news@mail.example.co.uk"),
    ("ipv4", "服务器10.0.0.1上", "10.0.0.1"),
    ("ipv4", "ping 8.8.8.8.", "8.8.8.8"),
    ("ipv4", "host=192.168.1.255", "192.168.1.255"),
    ("ipv6", "addr 2001:db8::1 up", "2001:db8::1"),
    ("ipv6", "IPv6:fe80::1ff:fe23:4567:890a", "fe80::1ff:fe23:4567:890a"),
    ("ipv6", "地址:2001:db8:0:0:0:0:0:2", "2001:db8:0:0:0:0:0:2"),
    ("ipv6", "mapped ::ffff:10.0.0.1", "::ffff:10.0.0.1"),
]

# Texts in which nothing may be found.
NEGATIVE = [
    f"订单号 {ORDER_NO}",
    "金额¥13800.00元",
    "total 1,380,000 yuan",
    "日期2024-01-15",
    "日期20240115",
    "at 2024-01-15 13:45:00 UTC",
    "time 12:30:45",
    "version 1.2.3.4.5",
    "release v1.2.3.4",
    "256.1.1.1 and 01.02.03.04",
    "手机1381234800",  # 10 digits
    "手机138123480001",  # 12 digits
    "号码12812348000",  # 12x is not a mobile prefix
    "ref 99913812348000123",  # inside a longer run
    f"身份证{BAD_ID}",  # wrong check digit
    f"身份证{BAD_DATE_ID}",
    f"身份证{BAD_REGION_ID}",
    "card 4111111111111112",  # fails Luhn
    "pad 0000000000000000",  # Luhn-valid filler
    "mail a..b@example.com or user@localhost or @example.com",
    "MAC 00:1A:2B:3C:4D:5E",
    "std::vector and a :: b",
    "",
]
