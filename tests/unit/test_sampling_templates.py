from typing import Any

import pytest

from llmesh.pb.common.v1 import types_pb2
from llmesh.runtime.errors import InvalidArgument, NotFound
from llmesh.services.inference.sampling import Sampling
from llmesh.services.inference.templates import TemplateLibrary


def sampling(**kw: Any) -> Sampling:
    return Sampling.from_pb(types_pb2.SamplingParams(**kw), default_max_tokens=128, max_tokens_limit=512)


def test_defaults() -> None:
    s = sampling()
    assert (s.temperature, s.top_p, s.top_k, s.max_tokens, s.seed, s.repetition_penalty) == (
        1.0,
        1.0,
        0,
        128,
        None,
        1.0,
    )


def test_request_values_win_over_template_defaults() -> None:
    defaults = types_pb2.SamplingParams(temperature=0.0, max_tokens=16, stop=["x"])
    s = Sampling.from_pb(
        types_pb2.SamplingParams(max_tokens=4), default_max_tokens=128, max_tokens_limit=512, defaults=defaults
    )
    assert (s.temperature, s.max_tokens, s.stop) == (0.0, 4, ("x",))


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"temperature": 2.5}, "sampling.temperature"),
        ({"temperature": -0.1}, "sampling.temperature"),
        ({"top_p": 0.0}, "sampling.top_p"),
        ({"top_p": 1.5}, "sampling.top_p"),
        ({"top_k": 1001}, "sampling.top_k"),
        ({"max_tokens": 0}, "sampling.max_tokens"),
        ({"max_tokens": 513}, "sampling.max_tokens"),
        ({"repetition_penalty": 0.5}, "sampling.repetition_penalty"),
        ({"stop": ["a"] * 9}, "sampling.stop"),
        ({"stop": [""]}, "sampling.stop[0]"),
        ({"stop": ["x" * 65]}, "sampling.stop[0]"),
        ({"seed": 2**63}, "sampling.seed"),
    ],
)
def test_out_of_range_names_the_field(kw: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        sampling(**kw)
    assert e.value.field == field


def test_bundled_library_has_the_seed_patterns() -> None:
    names = {t.name for t in TemplateLibrary.load()}
    assert {
        "classification",
        "summarization",
        "translation",
        "sentiment",
        "entity_extraction",
        "chain_of_thought",
        "expert",
        "assistant",
    } <= names


def test_render_and_strict_variables() -> None:
    t = TemplateLibrary.load().get("translation")
    assert t.variables == ("source_lang", "target_lang", "text")
    out = t.render({"text": "你好", "source_lang": "中文", "target_lang": "英文"})
    assert "将以下中文文本翻译成英文" in out and "你好" in out
    with pytest.raises(InvalidArgument) as e:
        t.render({"text": "你好", "source_lang": "中文"})
    assert e.value.field == "template.variables.target_lang"
    with pytest.raises(InvalidArgument) as e:
        t.render({"text": "a", "source_lang": "b", "target_lang": "c", "extra": "d"})
    assert e.value.field == "template.variables.extra"
    with pytest.raises(NotFound):
        TemplateLibrary.load().get("nope")
