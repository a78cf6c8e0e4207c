"""End to end: structured output (JSON schema, choice list, regex) through the real mesh.

The session mesh serves the random tiny LM: it wanders, so the schemas are bounded
(maxLength, maxItems, minimum/maximum, enums) and the checks are the format's guarantees —
every STOP output validates, an output cut by max_tokens is LENGTH and not valid — not the
content. Constrained and unconstrained requests run concurrently, so they share batches.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import jsonschema  # type: ignore[import-untyped]  # no stubs in the pinned set
import pytest

from llmesh.client import ApiKey, describe_error, gateway_channel, sampling
from llmesh.pb.common.v1 import types_pb2
from llmesh.pb.inference.v1 import inference_pb2 as pb
from llmesh.pb.inference.v1 import inference_pb2_grpc as pb_grpc
from llmesh.pb.security.v1 import security_pb2 as spb
from tests.support.mesh import Mesh

STOP, LENGTH = types_pb2.FINISH_REASON_STOP, types_pb2.FINISH_REASON_LENGTH
NAME = {"type": "string", "maxLength": 12}
SCHEMAS: list[dict[str, Any]] = [
    {  # strings and an integer range
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {  # an enum and a bounded number
        "type": "object",
        "properties": {
            "label": {"enum": ["spam", "ham", "unsure"]},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["label", "score"],
        "additionalProperties": False,
    },
    {  # arrays of strings and of enums
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": NAME, "maxItems": 3},
            "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        },
        "required": ["tags", "colors"],
        "additionalProperties": False,
    },
    {  # nested objects, a boolean
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {"first": NAME, "last": NAME},
                "required": ["first", "last"],
                "additionalProperties": False,
            },
            "active": {"type": "boolean"},
        },
        "required": ["person", "active"],
        "additionalProperties": False,
    },
    {  # a top-level array of small objects
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999}, "city": NAME},
            "required": ["id", "city"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 3,
    },
]


def _schema_request(i: int) -> tuple[pb.GenerateRequest, dict[str, Any]]:
    schema = SCHEMAS[i % len(SCHEMAS)]
    req = pb.GenerateRequest(
        prompt=f"Return JSON, item {i}:",
        sampling=sampling(max_tokens=256, temperature=1.0, seed=1000 + i),
        response_format=pb.ResponseFormat(json_schema=json.dumps(schema)),
    )
    return req, schema


def test_fifty_schema_outputs_validate_when_they_stop(stub) -> None:
    reqs = [_schema_request(i) for i in range(50)]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda rs: stub.Generate(rs[0], timeout=120), reqs))
    stops = 0
    for (_, schema), r in zip(reqs, got, strict=True):
        assert r.HasField("structured")
        if r.finish_reason == STOP:
            stops += 1
            assert r.structured.valid
            jsonschema.validate(json.loads(r.text), schema)
        else:
            assert r.finish_reason == LENGTH and not r.structured.valid
    assert stops >= 45, f"{stops} of 50 ended with STOP"


def test_cut_by_max_tokens_is_length_and_not_valid(stub) -> None:
    req, _ = _schema_request(0)
    req.sampling.max_tokens = 3
    r = stub.Generate(req, timeout=60)
    assert r.finish_reason == LENGTH and r.HasField("structured") and not r.structured.valid


def test_choice_probabilities_and_greedy_argmax(stub) -> None:
    choices = ["billing", "technical support", "sales", "other"]
    fmt = pb.ResponseFormat(choice=pb.ChoiceList(choices=choices))
    greedy = stub.Generate(
        pb.GenerateRequest(prompt="My invoice is wrong.", sampling=sampling(temperature=0.0), response_format=fmt),
        timeout=60,
    )
    st = greedy.structured
    probs = [c.probability for c in st.choices]
    assert st.valid and greedy.finish_reason == STOP
    assert sorted(c.choice for c in st.choices) == sorted(choices)
    assert abs(sum(probs) - 1) < 1e-6 and probs == sorted(probs, reverse=True)
    assert greedy.text == st.choices[0].choice  # the most probable at temperature 0
    req = pb.GenerateRequest(
        prompt="My invoice is wrong.", sampling=sampling(temperature=1.0, seed=3), response_format=fmt
    )
    text, last = "", None
    for msg in stub.GenerateStream(req, timeout=60):
        text += msg.text_delta
        last = msg
    assert last is not None and text in choices and last.structured.valid
    assert [c.choice for c in last.structured.choices] == [c.choice for c in st.choices]


def test_regex_and_mixed_batches(stub) -> None:
    pattern = r"[A-Z]{2}-[0-9]{3,5}"
    regex = [
        pb.GenerateRequest(
            prompt=f"Ticket {i}:",
            sampling=sampling(max_tokens=32, temperature=1.0, seed=i),
            response_format=pb.ResponseFormat(regex=pattern),
        )
        for i in range(8)
    ]
    plain = [pb.GenerateRequest(prompt=f"hello {i}", sampling=sampling(max_tokens=24, seed=i)) for i in range(8)]
    solo = [stub.Generate(r, timeout=60) for r in plain[:2]]
    mixed = [x for pair in zip(regex, plain, strict=True) for x in pair]  # constrained next to plain
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda r: stub.Generate(r, timeout=120), mixed))
    for r in got[0::2]:
        assert r.finish_reason == STOP and r.structured.valid and re.fullmatch(pattern, r.text), r.text
    for r in got[1::2]:
        assert not r.HasField("structured") and r.usage.completion_tokens > 0
    assert [r.text for r in got[1:4:2]] == [r.text for r in solo]  # seeded: batching changed nothing


def test_chat_and_templates_carry_the_format(stub) -> None:
    chat = stub.Chat(
        pb.ChatRequest(
            message="Is this spam?",
            sampling=sampling(temperature=0.0),
            response_format=pb.ResponseFormat(choice=pb.ChoiceList(choices=["spam", "not spam"])),
        ),
        timeout=60,
    )
    assert chat.reply.content in ("spam", "not spam") and chat.structured.valid and len(chat.structured.choices) == 2
    listed = {t.name: t for t in stub.ListTemplates(pb.ListTemplatesRequest(), timeout=10).templates}
    assert listed["classification"].response_format.WhichOneof("format") == "choice"
    schema = json.loads(listed["entity_extraction"].response_format.json_schema)
    cls = stub.Generate(
        pb.GenerateRequest(
            template=pb.TemplateInput(
                name="classification", variables={"text": "退款还没到账", "categories": "账单，技术支持、其他"}
            )
        ),
        timeout=60,
    )
    assert cls.text in ("账单", "技术支持", "其他") and len(cls.structured.choices) == 3
    ent = stub.Generate(
        pb.GenerateRequest(
            template=pb.TemplateInput(name="entity_extraction", variables={"text": "Tim Cook visited Beijing."})
        ),
        timeout=120,
    )
    assert ent.HasField("structured")
    if ent.finish_reason == STOP:
        jsonschema.validate(json.loads(ent.text), schema)


def _code_and_field(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    failure = describe_error(e.value)
    assert "Traceback" not in failure.message and "RequestError" not in failure.message
    return e.value.code(), failure.field


@pytest.mark.parametrize(
    "fmt, field",
    [
        (pb.ResponseFormat(json_schema="{nope"), "response_format.json_schema"),
        (pb.ResponseFormat(json_schema='{"type": "object", "properties": 3}'), "response_format.json_schema"),
        (pb.ResponseFormat(choice=pb.ChoiceList()), "response_format.choice.choices"),
        (pb.ResponseFormat(regex="(unclosed"), "response_format.regex"),
        (pb.ResponseFormat(regex="(?=a)a"), "response_format"),  # Python accepts it, the grammar engine does not
    ],
)
def test_bad_formats_are_invalid_argument(stub, fmt: pb.ResponseFormat, field: str) -> None:
    req = pb.GenerateRequest(prompt="x", response_format=fmt)
    assert _code_and_field(lambda: stub.Generate(req, timeout=60)) == (grpc.StatusCode.INVALID_ARGUMENT, field)


@pytest.fixture(scope="module")
def via_gateway(mesh: Mesh) -> Iterator[pb_grpc.InferenceStub]:
    created = mesh.security().CreateApiKey(
        spb.CreateApiKeyRequest(owner="structured", tenant="acme", scopes=["inference:*"]), timeout=10
    )
    key = ApiKey(created.key.key_id, created.secret)
    with gateway_channel(f"127.0.0.1:{mesh.cfg.gateway.server.port}", key) as ch:
        yield pb_grpc.InferenceStub(ch)


def test_through_the_gateway(via_gateway: pb_grpc.InferenceStub) -> None:
    fmt = pb.ResponseFormat(choice=pb.ChoiceList(choices=["yes", "no"]))
    r = via_gateway.Generate(
        pb.GenerateRequest(prompt="Ready?", sampling=sampling(temperature=0.0), response_format=fmt), timeout=60
    )
    assert r.text in ("yes", "no") and abs(sum(c.probability for c in r.structured.choices) - 1) < 1e-6
    bad = pb.GenerateRequest(prompt="x", response_format=pb.ResponseFormat(choice=pb.ChoiceList(choices=["a", "a"])))
    assert _code_and_field(lambda: via_gateway.Generate(bad, timeout=60)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "response_format.choice.choices",
    )
