"""The trainer's dataset layer: formats, row errors, dedup, split, hash (client paths:
tests/unit/test_paths.py)."""

from __future__ import annotations

import hashlib
import json
from importlib import resources

import pytest

from llmesh.runtime.errors import FailedPrecondition, InvalidArgument
from llmesh.services.trainer import datasets as ds
from llmesh.services.trainer.datasets import Example, Message, ParsedDataset, RowError
from llmesh.services.trainer.settings import TrainerSettings

# What the server parses translation pairs with when the request names no languages.
SERVER_LANGUAGES = ds.Languages(TrainerSettings().translation_source_lang, TrainerSettings().translation_target_lang)


def ex(*turns: tuple[str, str]) -> Example:
    return Example(tuple(Message(r, c) for r, c in turns))


def qa(q: str, a: str, system: str | None = None) -> Example:
    return ex(*([("system", system)] if system else []), ("user", q), ("assistant", a))


def jl(*objs: object) -> bytes:
    return "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs).encode()


def faq_bytes() -> bytes:
    return resources.files("llmesh.demo").joinpath("corpus/faq.json").read_bytes()


# --------------------------------------------------------------------------- positive cases

POSITIVE = [
    pytest.param(
        "alpaca_json",
        json.dumps(
            [
                {
                    "instruction": "将以下中文翻译成英文",
                    "input": "今天天气很好",
                    "output": "The weather is very good today.",
                },
                {"instruction": "解释高血压的成因", "input": "", "output": "高血压主要分为原发性和继发性..."},
            ],
            ensure_ascii=False,
        ).encode(),
        [
            qa("将以下中文翻译成英文\n今天天气很好", "The weather is very good today."),
            qa("解释高血压的成因", "高血压主要分为原发性和继发性..."),
        ],
        id="alpaca_json-input-appended",
    ),
    pytest.param(
        "alpaca_json",
        json.dumps(
            [
                {
                    "instruction": "  Say hi  ",
                    "output": " hi ",
                    "system": "You are terse.",
                    "history": [["你好", "你好！"], ["Who are you?", "A helpdesk bot."]],
                }
            ]
        ).encode(),
        [
            ex(
                ("system", "You are terse."),
                ("user", "你好"),
                ("assistant", "你好！"),
                ("user", "Who are you?"),
                ("assistant", "A helpdesk bot."),
                ("user", "Say hi"),
                ("assistant", "hi"),
            )
        ],
        id="alpaca_json-system-history-stripped",
    ),
    pytest.param(
        "alpaca_json",
        json.dumps([{"instruction": "x", "input": None, "output": "y", "system": "", "history": []}]).encode(),
        [qa("x", "y")],
        id="alpaca_json-empty-optionals",
    ),
    pytest.param(
        "alpaca_json",
        json.dumps(
            [
                {"question": "如何重置密码？", "answer": "打开 id.example.com。"},
                {"question": "How do I connect to the VPN?", "answer": "Install the client."},
            ],
            ensure_ascii=False,
        ).encode(),
        [qa("如何重置密码？", "打开 id.example.com。"), qa("How do I connect to the VPN?", "Install the client.")],
        id="faq_json",
    ),
    pytest.param(
        "faq_json",  # the proto draft's name is an alias
        b'[{"question": "q", "answer": "a"}]',
        [qa("q", "a")],
        id="faq_json-alias",
    ),
    pytest.param(
        "alpaca_jsonl",
        jl(
            {"instruction": "总结这段话", "input": "今天开会讨论了预算。", "output": "会议讨论预算。"},
            {"question": "Q?", "answer": "A."},
        )
        + b"\n   \n",
        [qa("总结这段话\n今天开会讨论了预算。", "会议讨论预算。"), qa("Q?", "A.")],
        id="alpaca_jsonl-blank-lines",
    ),
    pytest.param(
        "chat_jsonl",
        jl(
            {
                "messages": [
                    {"role": "system", "content": "你是客服。"},
                    {"role": "user", "content": "VPN 连不上"},
                    {"role": "assistant", "content": "请重启客户端。"},
                    {"role": "user", "content": "还是不行"},
                    {"role": "assistant", "content": "请联系 IT。"},
                ]
            }
        ),
        [
            ex(
                ("system", "你是客服。"),
                ("user", "VPN 连不上"),
                ("assistant", "请重启客户端。"),
                ("user", "还是不行"),
                ("assistant", "请联系 IT。"),
            )
        ],
        id="chat_jsonl-openai-multiturn",
    ),
    pytest.param(
        "chat_jsonl",
        jl(
            {
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Hello!"},
                ]
            }
        ),
        [ex(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"))],
        id="chat_jsonl-sharegpt",
    ),
    pytest.param(
        "chat_jsonl",
        b'{"messages": [{"role": "user", "content": "a\\u2028b"}, {"role": "assistant", "content": "c"}]}\r\n',
        [qa("a\u2028b", "c")],
        id="chat_jsonl-crlf-and-line-separator-in-content",
    ),
    pytest.param(
        "csv_qa",
        '\ufeff问题,答案\n如何申请年假？,在人事系统提交申请。\n"Hello, world?","Line one\nline two"\n\n'.encode(),
        [qa("如何申请年假？", "在人事系统提交申请。"), qa("Hello, world?", "Line one\nline two")],
        id="csv_qa-bom-zh-header-quoted",
    ),
    pytest.param(
        "csv_qa",
        b"id,Prompt,RESPONSE\r\n1,What is LoRA?,Low-rank adaptation.\r\n",
        [qa("What is LoRA?", "Low-rank adaptation.")],
        id="csv_qa-case-insensitive-extra-column",
    ),
    pytest.param(
        "csv_qa",
        b"instruction,input,output\nTranslate,hello,bonjour\nGreet,,hi\n",
        [qa("Translate\nhello", "bonjour"), qa("Greet", "hi")],
        id="csv_qa-alpaca-columns",
    ),
    pytest.param(
        "tsv_qa",
        "question\tanswer\n怎么申请年假？\t在人事系统提交。\n\nHow do I reset my password?\tUse the portal.\r\n".encode(),
        [qa("怎么申请年假？", "在人事系统提交。"), qa("How do I reset my password?", "Use the portal.")],
        id="tsv_qa-header-skipped",
    ),
    pytest.param(
        "tsv_translation",
        "今天天气很好\tThe weather is very good today.\n我爱你\tI love you.\n".encode(),
        [
            qa("将以下中文文本翻译成英文：\n今天天气很好", "The weather is very good today."),
            qa("将以下中文文本翻译成英文：\n我爱你", "I love you."),
        ],
        id="tsv_translation",
    ),
]


@pytest.mark.parametrize(("fmt", "data", "expected"), POSITIVE)
def test_parses(fmt: str, data: bytes, expected: list[Example]) -> None:
    parsed = ds.parse(data, fmt, languages=SERVER_LANGUAGES)
    assert parsed.errors == []
    assert parsed.examples == expected
    assert parsed.format == ds.normalize_format(fmt)
    ds.validate(parsed)


def test_translation_languages_are_parameters() -> None:
    parsed = ds.parse(b"Good morning\tBonjour\n", "tsv_translation", languages=ds.Languages("英文", "法文"))
    assert parsed.examples == [qa("将以下英文文本翻译成法文：\nGood morning", "Bonjour")]
    with pytest.raises(ValueError, match="needs the source and target languages"):
        ds.parse(b"Good morning\tBonjour\n", "tsv_translation")  # no silent default in the parser


def test_bundled_faq_parses_to_20_examples() -> None:
    data = faq_bytes()
    assert ds.detect_format("faq.json", data[:4096]) == "alpaca_json"
    parsed = ds.parse(data, "alpaca_json")
    assert parsed.errors == [] and parsed.duplicates == 0 and len(parsed.examples) == 20
    assert any("重置密码" in e.messages[0].content for e in parsed.examples)
    assert all([m.role for m in e.messages] == ["user", "assistant"] for e in parsed.examples)


# --------------------------------------------------------------------------- negative cases

NEGATIVE = [
    pytest.param("alpaca_json", b'[{"instruction": "x"', [(0, "invalid JSON")], id="alpaca_json-broken"),
    pytest.param(
        "alpaca_json",
        b'{"instruction": "x", "output": "y"}',
        [(0, "expected a JSON array")],
        id="alpaca_json-not-array",
    ),
    pytest.param(
        "alpaca_json",
        json.dumps(
            [
                {"instruction": "ok", "output": "fine"},
                {"instruction": "缺少输出"},
                "not an object",
                {"instruction": "  ", "output": "y"},
                {"instruction": "x", "output": 42},
                {"instruction": "x", "output": "y", "history": [["only one"]]},
                {"instruction": "x", "output": "y", "history": "no"},
                {"instruction": "x", "input": 3, "output": "y"},
                {"question": "q"},
                {"foo": "bar"},
            ],
            ensure_ascii=False,
        ).encode(),
        [
            (2, "missing 'output'"),
            (3, "expected a JSON object, got string"),
            (4, "empty 'instruction'"),
            (5, "'output' must be a string, got number"),
            (6, "history[0] must be a [user, assistant] pair"),
            (7, "'history' must be an array"),
            (8, "'input' must be a string"),
            (9, "missing 'answer'"),
            (10, "missing 'instruction'"),
        ],
        id="alpaca_json-row-errors",
    ),
    pytest.param(
        "alpaca_jsonl",
        b'{"instruction": "a", "output": "b"}\n\n{"instruction": "a",\n[1, 2]\n',
        [(3, "invalid JSON"), (4, "expected a JSON object, got array")],
        id="alpaca_jsonl-line-numbers",
    ),
    pytest.param(
        "chat_jsonl",
        jl(
            {"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "system", "content": "late"},
                    {"role": "assistant", "content": "c"},
                ]
            },
            {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
            {"messages": [{"role": "user", "content": ["part"]}, {"role": "assistant", "content": "y"}]},
            {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]},
            {"messages": "hi"},
            {"text": "hi"},
            {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
            {"conversations": [{"from": "human"}, {"from": "gpt", "value": "b"}]},
            {"messages": []},
            {"messages": [{"content": "a"}, {"role": "assistant", "content": "b"}]},
        ),
        [
            (1, "must end with an assistant message"),
            (2, "messages[0]: wrong role order: expected 'user', got 'assistant'"),
            (3, "messages[1]: wrong role order: expected 'assistant', got 'user'"),
            (4, "messages[2]: wrong role order: system may only come first"),
            (5, "messages[0].role must be one of system, user, assistant, got 'tool'"),
            (6, "messages[0].content must be a string, got array"),
            (7, "empty messages[0].content"),
            (8, "'messages' must be an array, got string"),
            (9, "expected a 'messages' or 'conversations' array"),
            (10, "conversations[1].from must be one of"),
            (11, "missing conversations[0].value"),
            (12, "needs at least one user message and one assistant reply"),
            (13, "missing messages[0].role"),
        ],
        id="chat_jsonl-role-order-and-types",
    ),
    pytest.param(
        "csv_qa",
        b"foo,bar\n1,2\n",
        [(1, "the header must name a question and an answer column")],
        id="csv_qa-no-known-header",
    ),
    pytest.param(
        "csv_qa",
        'question,answer\n好问题,\n,answer only\n"multi\nline q",ok\nonly one\na,b,c\nx,"y"z\n'.encode(),
        [
            (2, "empty 'answer'"),
            (3, "empty 'question'"),
            (6, "expected 2 columns, got 1"),
            (7, "expected 2 columns, got 3"),
            (8, "malformed CSV"),
        ],
        id="csv_qa-rows-count-physical-lines",
    ),
    pytest.param(
        "csv_qa",
        b'question,answer\nok,fine\n"never closed,x\n',
        [(3, "malformed CSV: unexpected end of data")],
        id="csv_qa-unterminated-quote",
    ),
    pytest.param(
        "tsv_qa",
        "好\t很好\nno tab here\na\tb\tc\n\t答案\n问题\t \n".encode(),
        [
            (2, "expected 2 tab-separated columns, got 1"),
            (3, "expected 2 tab-separated columns, got 3"),
            (4, "empty 'question'"),
            (5, "empty 'answer'"),
        ],
        id="tsv_qa-row-errors",
    ),
    pytest.param(
        "tsv_translation",
        "你好\t\n\tHello\n".encode(),
        [(1, "empty target text"), (2, "empty source text")],
        id="tsv_translation-empty-sides",
    ),
    pytest.param(
        "tsv_qa",
        "好\t很好\n".encode() + b"\xff\xfe\tbad\n",
        [(0, "invalid UTF-8 at byte")],
        id="invalid-utf8-whole-file",
    ),
    pytest.param("chat_jsonl", b"[" * 100_000, [(1, "invalid JSON")], id="deeply-nested-json"),
]


@pytest.mark.parametrize(("fmt", "data", "expected"), NEGATIVE)
def test_row_errors(fmt: str, data: bytes, expected: list[tuple[int, str]]) -> None:
    parsed = ds.parse(data, fmt, languages=SERVER_LANGUAGES)
    assert [e.row for e in parsed.errors] == [row for row, _ in expected], parsed.errors
    for err, (_, fragment) in zip(parsed.errors, expected, strict=True):
        assert fragment in err.reason, err
    with pytest.raises(InvalidArgument) as info:
        ds.validate(parsed)
    assert info.value.field == "dataset"


def test_good_rows_survive_next_to_bad_ones() -> None:
    parsed = ds.parse(b"question,answer\nq1,a1\nq2,\nq3,a3\n", "csv_qa")
    assert parsed.examples == [qa("q1", "a1"), qa("q3", "a3")]
    assert parsed.errors == [RowError(3, "empty 'answer'")]


def test_unknown_format_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument) as info:
        ds.parse(b"x", "xml")
    assert info.value.field == "format"


def test_error_reasons_clip_client_data() -> None:
    parsed = ds.parse(jl({"messages": [{"role": "x" * 5000, "content": "a"}]}), "chat_jsonl")
    assert len(parsed.errors[0].reason) < 200


# --------------------------------------------------------------------------- validate


def test_validate_lists_first_rows_and_counts_the_rest() -> None:
    errors = [RowError(i, f"bad {i}") for i in range(1, 26)]
    with pytest.raises(InvalidArgument) as info:
        ds.validate(ParsedDataset("tsv_qa", [qa("q", "a")], errors, 0), max_errors_reported=3)
    assert info.value.field == "dataset"
    assert info.value.description == "row 1: bad 1; row 2: bad 2; row 3: bad 3 (and 22 more)"


def test_validate_names_whole_file_errors() -> None:
    with pytest.raises(InvalidArgument, match="file: invalid UTF-8"):
        ds.validate(ds.parse(b"\xc3(", "csv_qa"))


@pytest.mark.parametrize(
    ("fmt", "data"),
    [
        ("tsv_qa", b""),
        ("tsv_qa", b"\n\n  \n"),
        ("tsv_qa", b"question\tanswer\n"),
        ("csv_qa", b""),
        ("csv_qa", b"\xef\xbb\xbfquestion,answer\r\n"),
        ("chat_jsonl", b"\n"),
        ("alpaca_json", b"[]"),
    ],
)
def test_validate_refuses_empty_dataset(fmt: str, data: bytes) -> None:
    parsed = ds.parse(data, fmt)
    assert parsed.errors == []
    with pytest.raises(InvalidArgument, match="empty dataset"):
        ds.validate(parsed)


def test_validate_passes_clean_dataset() -> None:
    ds.validate(ParsedDataset("tsv_qa", [qa("q", "a")], [], 0))


# --------------------------------------------------------------------------- dedup


def test_exact_duplicates_dropped_first_kept() -> None:
    data = b"a\t1\nb\t2\na\t1\n a \t 1 \nc\t3\nb\t2\nA\t1\n"
    parsed = ds.parse(data, "tsv_qa")
    assert parsed.examples == [qa("a", "1"), qa("b", "2"), qa("c", "3"), qa("A", "1")]
    assert parsed.duplicates == 3


def test_dedup_spans_formats_of_the_same_content() -> None:
    parsed = ds.parse(
        jl(
            {"instruction": "q", "output": "a"},
            {"question": "q", "answer": "a"},
            {"instruction": "q", "output": "a", "system": "s"},
        ),
        "alpaca_jsonl",
    )
    assert parsed.examples == [qa("q", "a"), qa("q", "a", system="s")] and parsed.duplicates == 1


def test_parse_is_linear_on_large_inputs() -> None:
    # 200k rows, half duplicates: a quadratic dedup or line split would take minutes.
    lines = [f"问题 {i % 100_000}\tanswer {i % 100_000}" for i in range(200_000)]
    parsed = ds.parse("\n".join(lines).encode(), "tsv_qa")
    assert len(parsed.examples) == 100_000 and parsed.duplicates == 100_000


# --------------------------------------------------------------------------- detect_format

DETECT = [
    ("train.jsonl", jl({"messages": [{"role": "user", "content": "a"}]}), "chat_jsonl"),
    ("train.JSONL", jl({"conversations": [{"from": "human", "value": "a"}]}), "chat_jsonl"),
    ("train.jsonl", jl({"instruction": "a", "output": "b"}), "alpaca_jsonl"),
    ("train.ndjson", jl({"question": "a", "answer": "b"}), "alpaca_jsonl"),
    ("data.json", b' \n[{"instruction": "a", "input": "", "output": "b"}]', "alpaca_json"),
    ("faq.json", '[{"question": "如何重置密码？", "answer": "x"}]'.encode(), "alpaca_json"),
    ("lines.json", jl({"messages": []}, {"messages": []}), "chat_jsonl"),
    ("qa.csv", b"anything,at,all\n", "csv_qa"),
    ("pairs.tsv", b"a\tb\n", "tsv_qa"),
    ("pairs.txt", "\n你好\tHello\n".encode(), "tsv_qa"),
    ("upload", b'[{"question": "a", "answer": "b"}]', "alpaca_json"),
    ("upload", jl({"messages": []}), "chat_jsonl"),
    ("upload", b"a\tb\n", "tsv_qa"),
    ("C:\\data\\train.jsonl", jl({"instruction": "a"}), "alpaca_jsonl"),
]


@pytest.mark.parametrize(("name", "head", "expected"), DETECT)
def test_detect_format(name: str, head: bytes, expected: str) -> None:
    assert ds.detect_format(name, head) == expected


def test_detect_translation_when_told() -> None:
    assert ds.detect_format("zh-en.tsv", "你好\tHello\n".encode(), translation=True) == "tsv_translation"


def test_detect_works_on_a_truncated_first_line() -> None:
    head = jl({"messages": [{"role": "user", "content": "长" * 5000}]})[:4096]
    assert ds.detect_format("x.jsonl", head) == "chat_jsonl"
    head = jl({"instruction": "x" * 5000, "output": "y"})[:4096]
    assert ds.detect_format("x.jsonl", head) == "alpaca_jsonl"


@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("notes.md", b"# hello"),
        ("data.json", b'[{"text": "x"}]'),
        ("chat.json", b'[{"messages": [{"role": "user", "content": "a"}]}]'),
        ("data.json", b'"just a string"'),
        ("x.jsonl", b'{"text": "x"}\n'),
        ("x.jsonl", b"not json at all"),
        ("pairs.tsv", b"no tabs here\n"),
        ("blob", b"\x00\x01binary"),
    ],
)
def test_detect_refuses_what_it_cannot_tell(name: str, head: bytes) -> None:
    with pytest.raises(InvalidArgument) as info:
        ds.detect_format(name, head)
    assert info.value.field == "format"


# --------------------------------------------------------------------------- split


def _many(n: int) -> list[Example]:
    return [qa(f"q{i}", f"a{i}") for i in range(n)]


@pytest.mark.parametrize(
    ("n", "fraction", "n_eval"),
    [
        (100, 0.1, 10),
        (100, 0.0, 0),
        (100, 0.5, 50),
        (10, 0.01, 1),
        (2, 0.1, 1),
        (1, 0.5, 0),
        (0, 0.2, 0),
        (7, 0.25, 2),
        (3, 0.5, 2),
    ],
)
def test_split_sizes(n: int, fraction: float, n_eval: int) -> None:
    examples = _many(n)
    train, evals = ds.split(examples, fraction, seed=1)
    assert len(evals) == n_eval and len(train) == n - n_eval
    assert sorted(train + evals, key=examples.index) == examples  # a partition, nothing lost or doubled


def test_split_is_deterministic_per_seed() -> None:
    examples = _many(50)
    assert ds.split(examples, 0.2, seed=7) == ds.split(list(examples), 0.2, seed=7)
    assert ds.split(examples, 0.2, seed=7) != ds.split(examples, 0.2, seed=8)
    assert ds.split(examples, 0.2, seed=7)[1] != examples[:10]  # shuffled, not the head of the file


@pytest.mark.parametrize("fraction", [-0.1, 0.51, 1.0, float("nan"), float("inf")])
def test_split_refuses_bad_fraction(fraction: float) -> None:
    with pytest.raises(InvalidArgument) as info:
        ds.split(_many(10), fraction, seed=0)
    assert info.value.field == "eval_fraction"


# --------------------------------------------------------------------------- hash and stored form


def test_content_hash_is_stable_and_order_sensitive() -> None:
    a = [qa("如何重置密码？", "打开门户。"), qa("VPN?", "Restart.", system="s")]
    h = ds.content_hash(a)
    assert len(h) == 64 and h == ds.content_hash(
        [qa("如何重置密码？", "打开门户。"), qa("VPN?", "Restart.", system="s")]
    )
    assert h != ds.content_hash(list(reversed(a)))
    assert h != ds.content_hash([a[0]])
    # pinned: a change in the canonical form would silently re-key every stored dataset
    line = b'{"messages":[{"content":"q","role":"user"},{"content":"a","role":"assistant"}]}\n'
    assert ds.content_hash([qa("q", "a")]) == hashlib.sha256(line).hexdigest()


def test_content_hash_is_the_hash_of_the_stored_form() -> None:
    examples = ds.parse(faq_bytes(), "alpaca_json").examples
    assert ds.content_hash(examples) == hashlib.sha256(ds.to_jsonl(examples)).hexdigest()


def test_jsonl_round_trip_keeps_order_and_duplicates() -> None:
    examples = [qa("你好", 'Hello\n"quoted"'), qa("a\u2028b", "c", system="sys"), qa("你好", 'Hello\n"quoted"')]
    data = ds.to_jsonl(examples)
    assert data.count(b"\n") == 3 and "你好".encode() in data  # UTF-8, not \u escapes
    assert ds.from_jsonl(data) == examples
    assert ds.parse(data, "chat_jsonl").examples == examples[:2]  # the stored form is valid chat_jsonl
    assert ds.to_jsonl([]) == b"" and ds.from_jsonl(b"") == []


@pytest.mark.parametrize("data", [b"{broken\n", b'{"messages": [{"role": "user", "content": "a"}]}\n', b"\xff"])
def test_from_jsonl_refuses_corrupt_store(data: bytes) -> None:
    with pytest.raises(FailedPrecondition, match="stored dataset is corrupt"):
        ds.from_jsonl(data)


def test_example_enforces_turn_order() -> None:
    with pytest.raises(ValueError):
        ex(("user", "a"))
    with pytest.raises(ValueError):
        ex(("assistant", "a"), ("user", "b"))
    with pytest.raises(ValueError):
        Message("tool", "x")
    assert qa("q", "a", system="s").target == "a"
