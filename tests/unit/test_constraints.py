"""Structured output without a mesh: the model's constraint code on the tiny tokenizer, the
llm model in-process (fake Triton utils), and the service's ResponseFormat checks."""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")
jsonschema = pytest.importorskip("jsonschema")

from llmesh.demo.models import build_llm  # noqa: E402
from llmesh.pb.inference.v1 import inference_pb2 as pb  # noqa: E402
from llmesh.runtime.errors import InvalidArgument  # noqa: E402
from llmesh.services.inference.response_format import model_json, split_choices, structured_pb  # noqa: E402
from llmesh.services.inference.templates import TemplateLibrary  # noqa: E402
from tests.support.triton_llm import FakeRequest, load_llm, load_module, results  # noqa: E402

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "score", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def lm_path(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_llm(tmp_path_factory.mktemp("constraints") / "tiny-qwen2")


@pytest.fixture(scope="module")
def mods(lm_path: pathlib.Path) -> Any:
    load_module("llm")  # the model's modules, imported as Triton does (fake utils)
    import llm_constraints  # type: ignore[import-not-found]  # the llm model's folder, put on sys.path at run time as Triton does
    import llm_errors  # type: ignore[import-not-found]  # (same)
    import llm_request  # type: ignore[import-not-found]  # (same)
    import llm_sampling  # type: ignore[import-not-found]  # (same)

    return llm_constraints, llm_errors, llm_request, llm_sampling


@pytest.fixture(scope="module")
def tokenizer(lm_path: pathlib.Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(lm_path))


@pytest.fixture(scope="module")
def model(lm_path: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    home = tmp_path_factory.mktemp("home")
    os.environ["LLMESH_LLM_PATH"] = str(lm_path)
    os.environ["LLMESH_HOME"] = str(home)
    _, m = load_llm({"model_path": "${LLMESH_LLM_PATH}", "adapter_dir": "${LLMESH_HOME}/adapters", "threads": "2"})
    yield m
    m.finalize()


def _fmt(**kw: Any) -> str:
    return json.dumps(kw)


def _run(model: Any, *inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """results() plus each request's structured_json verdict (None when absent)."""
    reqs = [FakeRequest(i) for i in inputs]
    model.execute(reqs)
    out = results(reqs)
    for r, o in zip(reqs, out, strict=True):
        final = next(resp for resp, flags in r.sender.sent if flags & 1)
        raw = final.outputs.get("structured_json")
        o["structured"] = json.loads(raw) if raw else None
    return out


# ---------------------------------------------------------------- formats (model side)


@pytest.mark.parametrize(
    "text, why",
    [
        ("{", "bad JSON"),
        ("[1]", "JSON object"),
        (_fmt(type="xml"), "unknown type"),
        (_fmt(type="choice", choices=[]), "non-empty list"),
        (_fmt(type="choice", choices=["a", "a"]), "unique"),
        (_fmt(type="choice", choices=[str(i) for i in range(65)]), "limit"),
        (_fmt(type="choice", choices=["x" * 257]), "longer"),
        (_fmt(type="regex", pattern=""), "non-empty pattern"),
        (_fmt(type="json_schema"), "schema object"),
    ],
)
def test_parse_format_refuses_bad_formats(mods: Any, text: str, why: str) -> None:
    llm_constraints, llm_errors, *_ = mods
    with pytest.raises(llm_errors.RequestError) as e:
        llm_constraints.parse_format(text)
    assert e.value.code == "INVALID_ARGUMENT" and e.value.field == "response_format_json"
    assert why in e.value.message


def test_grammar_errors_name_the_input(mods: Any, tokenizer: Any) -> None:
    llm_constraints, llm_errors, *_ = mods
    for fmt, why in (
        ({"type": "regex", "pattern": "[a-"}, "bad regex"),
        ({"type": "json_schema", "schema": {"type": "frobnicate"}}, "bad schema"),
    ):
        with pytest.raises(llm_errors.RequestError) as e:
            llm_constraints.prepare(fmt, tokenizer)
        assert e.value.field == "response_format_json" and why in e.value.message
        assert "Traceback" not in e.value.message


def test_compiled_formats_are_cached_and_bounded(mods: Any, tokenizer: Any) -> None:
    llm_constraints, *_ = mods
    g = llm_constraints.Grammars(tokenizer, cache_size=2)
    a = {"type": "regex", "pattern": "a+"}
    assert g.compile(a) is g.compile(dict(a))  # same format, same compiled matcher
    g.compile({"type": "regex", "pattern": "b+"})
    g.compile({"type": "regex", "pattern": "c+"})
    assert len(g._cache) == 2
    m1, m2 = g.matcher({"type": "regex", "pattern": "c+"}), g.matcher({"type": "regex", "pattern": "c+"})
    assert m1.ll is not m2.ll  # every row decodes with its own copy


def _walk(mods: Any, tokenizer: Any, fmt: dict[str, Any], seed: int, max_tokens: int = 200) -> tuple[str, Any]:
    """Sample a constrained row from random logits until EOS (or max_tokens)."""
    llm_constraints, _, llm_request, llm_sampling = mods
    row = llm_request.Row(FakeRequest({}))
    row.temperature = 1.0
    row.generator = torch.Generator().manual_seed(seed)
    row.constraint = llm_constraints.prepare(fmt, tokenizer)
    logits_gen = torch.Generator().manual_seed(seed + 1000)
    vocab = 3072  # the model's logits are wider than the tokenizer (2949): padding stays masked
    toks: list[int] = []
    for _ in range(max_tokens):
        tok = llm_sampling.sample(row, torch.randn(vocab, generator=logits_gen) * 4)
        assert tok < len(tokenizer)
        if tok == tokenizer.eos_token_id:
            break
        toks.append(tok)
    return tokenizer.decode(toks), row.constraint


def test_masked_walks_follow_the_schema(mods: Any, tokenizer: Any) -> None:
    for seed in range(8):
        text, matcher = _walk(mods, tokenizer, {"type": "json_schema", "schema": PERSON}, seed)
        assert matcher.complete, text
        jsonschema.validate(json.loads(text), PERSON)


def test_masked_walks_match_the_regex(mods: Any, tokenizer: Any) -> None:
    pattern = r"[A-Z]{2}-[0-9]{3}"
    for seed in range(5):
        text, matcher = _walk(mods, tokenizer, {"type": "regex", "pattern": pattern}, seed)
        assert matcher.complete and re.fullmatch(pattern, text), text


def test_unconstrained_rows_are_untouched(mods: Any) -> None:
    _, _, llm_request, llm_sampling = mods
    logits = torch.randn(3072, generator=torch.Generator().manual_seed(5))
    row = llm_request.Row(FakeRequest({}))
    row.generator = torch.Generator().manual_seed(9)
    got = [llm_sampling.sample(row, logits) for _ in range(5)]
    gen = torch.Generator().manual_seed(9)
    want = [int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)) for _ in range(5)]
    assert got == want


# ---------------------------------------------------------------- the model, in-process


def test_model_schema_stop_is_valid_and_length_is_not(model: Any) -> None:
    fmt = _fmt(type="json_schema", schema=PERSON)
    full, cut = _run(
        model,
        {"prompt": "A person as JSON:", "max_tokens": 200, "temperature": 1.0, "seed": 1, "response_format_json": fmt},
        {"prompt": "A person as JSON:", "max_tokens": 4, "temperature": 1.0, "seed": 1, "response_format_json": fmt},
    )
    assert full["finish"] == "stop" and full["structured"] == {"valid": True}
    jsonschema.validate(json.loads(full["text"]), PERSON)
    assert cut["finish"] == "length" and cut["structured"] == {"valid": False}


def test_model_mixes_constrained_and_plain_rows(model: Any) -> None:
    plain = {"prompt": "hello", "max_tokens": 12, "temperature": 1.0, "seed": 4}
    alone = _run(model, plain)[0]
    rows = _run(
        model,
        {
            "prompt": "x",
            "max_tokens": 40,
            "temperature": 1.0,
            "seed": 2,
            "response_format_json": _fmt(type="regex", pattern="[0-9]{4}"),
        },
        plain,
        {
            "prompt": "y",
            "max_tokens": 200,
            "temperature": 1.0,
            "seed": 3,
            "response_format_json": _fmt(type="json_object"),
        },
    )
    assert re.fullmatch("[0-9]{4}", rows[0]["text"]) and rows[0]["structured"] == {"valid": True}
    assert rows[1]["text"] == alone["text"] and rows[1]["structured"] is None  # same batch, untouched
    assert rows[2]["structured"] == {"valid": rows[2]["finish"] == "stop"}
    if rows[2]["finish"] == "stop":
        assert isinstance(json.loads(rows[2]["text"]), dict)


def test_model_scores_choices(model: Any) -> None:
    choices = ["yes", "no", "yes please", "maybe"]
    fmt = _fmt(type="choice", choices=choices)
    greedy, sampled = _run(
        model,
        {"prompt": "Well?", "temperature": 0.0, "response_format_json": fmt, "stream": True},
        {"prompt": "Well?", "temperature": 1.0, "seed": 7, "response_format_json": fmt},
    )
    st = greedy["structured"]
    probs = {c["choice"]: c["probability"] for c in st["choices"]}
    assert st["valid"] and set(probs) == set(choices) and abs(sum(probs.values()) - 1) < 1e-6
    assert [c["probability"] for c in st["choices"]] == sorted(probs.values(), reverse=True)
    assert greedy["text"] == st["choices"][0]["choice"] and greedy["finish"] == "stop"
    assert probs["yes"] != probs["yes please"]  # the end token tells them apart
    assert sampled["text"] in choices and sampled["structured"]["choices"] == st["choices"]


def test_model_bad_formats_are_invalid_argument(model: Any) -> None:
    bad = [
        "{",
        _fmt(type="choice", choices=[]),
        _fmt(type="regex", pattern="(a"),
        _fmt(type="json_schema", schema={"type": 3}),
    ]
    for got in _run(model, *({"prompt": "x", "response_format_json": b} for b in bad)):
        assert got["code"] == "INVALID_ARGUMENT" and got["field"] == "response_format_json", got


def test_model_raw_prompt_skips_the_chat_template(model: Any) -> None:
    templated, raw = _run(
        model,
        {"prompt": "hello", "max_tokens": 1, "temperature": 0.0},
        {"prompt": "hello", "max_tokens": 1, "temperature": 0.0, "raw": True},
    )
    assert "error" not in templated and "error" not in raw
    reqs = [FakeRequest({"prompt": "hello", "max_tokens": 1, "raw": r}) for r in (False, True)]
    model.execute(reqs)
    results(reqs)
    counts = [int(next(resp for resp, f in r.sender.sent if f & 1).outputs["prompt_tokens"]) for r in reqs]
    assert counts[0] > counts[1]  # the user turn of the chat template around "hello"


# ---------------------------------------------------------------- the service's checks


@pytest.mark.parametrize(
    "fmt, field",
    [
        (pb.ResponseFormat(json_schema="{not json"), "response_format.json_schema"),
        (pb.ResponseFormat(json_schema='{"type": 5}'), "response_format.json_schema"),
        (pb.ResponseFormat(json_schema="[1, 2]"), "response_format.json_schema"),
        (pb.ResponseFormat(choice=pb.ChoiceList()), "response_format.choice.choices"),
        (pb.ResponseFormat(choice=pb.ChoiceList(choices=["a", "a"])), "response_format.choice.choices"),
        (pb.ResponseFormat(choice=pb.ChoiceList(choices=["a", " "])), "response_format.choice.choices[1]"),
        (pb.ResponseFormat(choice=pb.ChoiceList(choices=["x" * 257])), "response_format.choice.choices[0]"),
        (
            pb.ResponseFormat(choice=pb.ChoiceList(choices=[str(i) for i in range(65)])),
            "response_format.choice.choices",
        ),
        (pb.ResponseFormat(regex="(a"), "response_format.regex"),
        (pb.ResponseFormat(json_object=False), "response_format.json_object"),
    ],
)
def test_service_refuses_bad_formats_naming_the_field(fmt: pb.ResponseFormat, field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        model_json(fmt)
    assert e.value.field == field


def test_service_format_json_and_verdict() -> None:
    assert model_json(pb.ResponseFormat()) == ""
    assert json.loads(model_json(pb.ResponseFormat(json_schema=json.dumps(PERSON)))) == {
        "type": "json_schema",
        "schema": PERSON,
    }
    assert json.loads(model_json(pb.ResponseFormat(json_object=True))) == {"type": "json_object"}
    st = structured_pb(json.dumps({"valid": True, "choices": [{"choice": "a", "probability": 0.75}]}))
    assert st is not None and st.valid and st.choices[0].choice == "a" and st.choices[0].probability == 0.75
    assert structured_pb("") is None


def test_templates_constrain_their_answers() -> None:
    lib = TemplateLibrary.load()
    cls = lib.get("classification")
    assert split_choices("账单, 技术支持，其他、HR / IT") == ["账单", "技术支持", "其他", "HR", "IT"]
    fmt = cls.format_for({"categories": "billing, tech", "text": "x"})
    assert fmt is not None and list(fmt.choice.choices) == ["billing", "tech"]
    with pytest.raises(InvalidArgument) as e:
        cls.format_for({"categories": " , ", "text": "x"})
    assert e.value.field == "template.variables.categories"
    ent = lib.get("entity_extraction")
    assert ent.response_format is not None
    schema = json.loads(ent.response_format.json_schema)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert set(schema["required"]) == {"persons", "places", "organizations"}
    assert lib.get("translation").response_format is None
