"""End to end: the inference service against the real tritonserver and Redis."""

from __future__ import annotations

import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from llmesh.client import describe_error, sampling
from llmesh.pb.common.v1 import types_pb2
from llmesh.pb.inference.v1 import inference_pb2 as pb
from tests.support.mesh import TEST_ADAPTER, Mesh


def gen(stub, prompt: str, **kw: Any) -> pb.GenerateResponse:
    adapter = str(kw.pop("adapter", ""))
    response: pb.GenerateResponse = stub.Generate(
        pb.GenerateRequest(prompt=prompt, sampling=sampling(**kw), adapter=adapter), timeout=60
    )
    return response


def stream_text(stub, request: pb.GenerateRequest) -> tuple[str, pb.GenerateStreamResponse]:
    parts, last = [], None
    for msg in stub.GenerateStream(request, timeout=60):
        parts.append(msg.text_delta)
        last = msg
    assert last is not None
    return "".join(parts), last


def test_unary_and_stream_agree_under_a_fixed_seed(stub) -> None:
    req = pb.GenerateRequest(prompt="如何重置密码?", sampling=sampling(max_tokens=24, seed=7, temperature=0.8))
    unary = stub.Generate(req, timeout=60)
    streamed, last = stream_text(stub, req)
    assert unary.text and unary.text == streamed
    assert last.finish_reason in (types_pb2.FINISH_REASON_STOP, types_pb2.FINISH_REASON_LENGTH)
    assert last.usage.completion_tokens == unary.usage.completion_tokens > 0
    assert unary.usage.prompt_tokens > 0
    assert unary.usage.total_tokens == unary.usage.prompt_tokens + unary.usage.completion_tokens
    # Same seed, same text; another seed, (almost surely) another text.
    assert stub.Generate(req, timeout=60).text == unary.text
    other = pb.GenerateRequest(prompt=req.prompt, sampling=sampling(max_tokens=24, seed=8, temperature=0.8))
    assert stub.Generate(other, timeout=60).text != unary.text


def test_max_tokens_and_stop_sequences(stub) -> None:
    r = gen(stub, "hello", max_tokens=5, temperature=0.0)
    assert r.usage.completion_tokens <= 5
    full = gen(stub, "the weather", max_tokens=40, temperature=0.0)
    if len(full.text) > 4:
        stop = full.text[2:4]
        cut = gen(stub, "the weather", max_tokens=40, temperature=0.0, stop=[stop])
        assert cut.finish_reason == types_pb2.FINISH_REASON_STOP
        assert stop not in cut.text and full.text.startswith(cut.text)


def test_concurrent_requests_batch_and_mix_adapters(stub) -> None:
    prompts = [(f"question {i}", TEST_ADAPTER if i % 2 else "") for i in range(8)]
    alone = [gen(stub, p, max_tokens=12, temperature=0.0, adapter=a).text for p, a in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(
            pool.map(lambda pa: gen(stub, pa[0], max_tokens=12, temperature=0.0, adapter=pa[1]).text, prompts)
        )
    assert together == alone
    base = gen(stub, "question 1", max_tokens=12, temperature=0.0).text
    assert base != alone[1], "the adapter must change the output"


def test_templates_list_render_and_generate(stub) -> None:
    names = {t.name: list(t.variables) for t in stub.ListTemplates(pb.ListTemplatesRequest(), timeout=10).templates}
    assert names["translation"] == ["source_lang", "target_lang", "text"]
    variables = {"text": "今天天气很好", "source_lang": "中文", "target_lang": "英文"}
    rendered = stub.RenderTemplate(pb.TemplateInput(name="translation", variables=variables), timeout=10).prompt
    assert rendered.startswith("将以下中文文本翻译成英文") and "今天天气很好" in rendered
    r = stub.Generate(
        pb.GenerateRequest(template=pb.TemplateInput(name="translation", variables=variables)), timeout=60
    )
    direct = stub.Generate(
        pb.GenerateRequest(prompt=rendered, sampling=sampling(temperature=0.2, max_tokens=256, seed=1)), timeout=60
    )
    assert r.usage.prompt_tokens == direct.usage.prompt_tokens  # the service rendered exactly that prompt


def test_chat_memory_carries_across_calls_and_expires(stub, mesh: Mesh) -> None:
    first = stub.Chat(
        pb.ChatRequest(message="我忘记了VPN密码", system_prompt="你是IT助手", sampling=sampling(max_tokens=8)),
        timeout=60,
    )
    cid = first.conversation_id
    assert cid and first.history_length == 2 and first.usage.completion_tokens > 0
    second = stub.Chat(
        pb.ChatRequest(conversation_id=cid, message="怎么重置?", sampling=sampling(max_tokens=8)), timeout=60
    )
    assert second.history_length == 4
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the history was sent to the model
    conv = stub.GetConversation(pb.GetConversationRequest(conversation_id=cid), timeout=10)
    assert [m.content for m in conv.messages] == [
        "你是IT助手",
        "我忘记了VPN密码",
        first.reply.content,
        "怎么重置?",
        second.reply.content,
    ]
    assert 0 < conv.ttl_seconds <= mesh.cfg.inference.chat_ttl_seconds
    # Streaming turn on the same conversation; history bounded to chat_max_messages (6).
    msgs = list(
        stub.ChatStream(
            pb.ChatRequest(conversation_id=cid, message="谢谢", sampling=sampling(max_tokens=8)), timeout=60
        )
    )
    assert msgs[-1].history_length == 6 and msgs[-1].finish_reason
    third = stub.Chat(pb.ChatRequest(conversation_id=cid, message="再见", sampling=sampling(max_tokens=8)), timeout=60)
    assert third.history_length == 6
    time.sleep(mesh.cfg.inference.chat_ttl_seconds + 1.5)
    with pytest.raises(grpc.RpcError) as e:
        stub.GetConversation(pb.GetConversationRequest(conversation_id=cid), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    again = stub.Chat(pb.ChatRequest(conversation_id=cid, message="你好", sampling=sampling(max_tokens=4)), timeout=60)
    assert again.history_length == 2


def test_converse_bidi_keeps_one_conversation(stub) -> None:
    turns = [pb.ChatRequest(message=m, sampling=sampling(max_tokens=6)) for m in ("hi", "how are you", "bye")]
    finals = [m for m in stub.Converse(iter(turns), timeout=60) if m.finish_reason]
    assert [m.history_length for m in finals] == [2, 4, 6]
    assert len({m.conversation_id for m in finals}) == 1
    assert stub.DeleteConversation(
        pb.DeleteConversationRequest(conversation_id=finals[0].conversation_id), timeout=10
    ).deleted


def _generated_tokens(mesh: Mesh) -> float:
    return _metric(mesh, "llmesh_llm_generated_tokens_total")


def test_cancelling_a_stream_stops_generation(stub, mesh: Mesh) -> None:
    before = _generated_tokens(mesh)
    call = stub.GenerateStream(
        pb.GenerateRequest(prompt="tell a long story", sampling=sampling(max_tokens=1000, temperature=1.0, seed=3)),
        timeout=60,
    )
    got = 0
    for _ in call:
        got += 1
        if got == 3:
            call.cancel()
            break
    # Wait until the counter settles, then check Triton stopped well short of max_tokens.
    settled, last = 0, -1.0
    for _ in range(50):
        now = _generated_tokens(mesh)
        settled = settled + 1 if now == last else 0
        if settled >= 3:
            break
        last = now
        time.sleep(0.2)
    assert last - before < 1000
    assert gen(stub, "still fine", max_tokens=4).usage.completion_tokens > 0


def _code_and_field(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    f = describe_error(e.value)
    return e.value.code(), f.field


INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD_GENERATE = [
    (pb.GenerateRequest(), INVALID, "prompt"),
    (pb.GenerateRequest(prompt="   "), INVALID, "prompt"),
    (pb.GenerateRequest(prompt="x" * 6001), INVALID, "prompt"),
    (
        pb.GenerateRequest(prompt="a " * 2900, sampling=sampling(max_tokens=10)),
        INVALID,
        "prompt",
    ),  # more tokens than the model's context
    (
        pb.GenerateRequest(prompt="a " * 400, sampling=sampling(max_tokens=1000)),
        INVALID,
        "sampling.max_tokens",
    ),  # prompt + max_tokens > context
    (pb.GenerateRequest(prompt="hi", sampling=sampling(temperature=3.0)), INVALID, "sampling.temperature"),
    (pb.GenerateRequest(prompt="hi", sampling=sampling(top_p=0.0)), INVALID, "sampling.top_p"),
    (pb.GenerateRequest(prompt="hi", sampling=sampling(top_k=5000)), INVALID, "sampling.top_k"),
    (pb.GenerateRequest(prompt="hi", sampling=sampling(max_tokens=0)), INVALID, "sampling.max_tokens"),
    (pb.GenerateRequest(prompt="hi", sampling=sampling(max_tokens=5000)), INVALID, "sampling.max_tokens"),
    (pb.GenerateRequest(prompt="hi", sampling=sampling(stop=["s"] * 9)), INVALID, "sampling.stop"),
    (pb.GenerateRequest(prompt="hi", adapter="../etc"), INVALID, "adapter"),
    (pb.GenerateRequest(prompt="hi", adapter="no-such-adapter"), grpc.StatusCode.NOT_FOUND, ""),
    (pb.GenerateRequest(template=pb.TemplateInput(name="nope")), grpc.StatusCode.NOT_FOUND, ""),
    (pb.GenerateRequest(template=pb.TemplateInput(name="")), INVALID, "template.name"),
    (
        pb.GenerateRequest(template=pb.TemplateInput(name="translation", variables={"text": "a"})),
        INVALID,
        "template.variables.source_lang",
    ),
]


@pytest.mark.parametrize(("request_", "code", "field"), BAD_GENERATE)
@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_bad_generate_input_gets_a_clear_status(
    stub, rpc: str, request_: pb.GenerateRequest, code: grpc.StatusCode, field: str
) -> None:
    call = (
        (lambda: stub.Generate(request_, timeout=30))
        if rpc == "Generate"
        else (lambda: list(stub.GenerateStream(request_, timeout=30)))
    )
    assert _code_and_field(call) == (code, field)


BAD_CHAT = [
    (pb.ChatRequest(message=""), INVALID, "message"),
    (pb.ChatRequest(message="x" * 6001), INVALID, "message"),
    (pb.ChatRequest(message="hi", conversation_id="bad id!"), INVALID, "conversation_id"),
    (pb.ChatRequest(message="hi", sampling=sampling(top_p=2.0)), INVALID, "sampling.top_p"),
    (pb.ChatRequest(message="hi", adapter="no-such-adapter"), grpc.StatusCode.NOT_FOUND, ""),
]


@pytest.mark.parametrize(("request_", "code", "field"), BAD_CHAT)
@pytest.mark.parametrize("rpc", ["Chat", "ChatStream", "Converse"])
def test_bad_chat_input_gets_a_clear_status(
    stub, rpc: str, request_: pb.ChatRequest, code: grpc.StatusCode, field: str
) -> None:
    calls = {
        "Chat": lambda: stub.Chat(request_, timeout=30),
        "ChatStream": lambda: list(stub.ChatStream(request_, timeout=30)),
        "Converse": lambda: list(stub.Converse(iter([request_]), timeout=30)),
    }
    assert _code_and_field(calls[rpc]) == (code, field)


def test_bad_input_for_the_other_rpcs(stub) -> None:
    nf, inv = grpc.StatusCode.NOT_FOUND, INVALID
    assert _code_and_field(
        lambda: stub.GetConversation(pb.GetConversationRequest(conversation_id="never-used"), timeout=10)
    ) == (nf, "")
    assert _code_and_field(lambda: stub.GetConversation(pb.GetConversationRequest(conversation_id=""), timeout=10)) == (
        inv,
        "conversation_id",
    )
    assert _code_and_field(
        lambda: stub.DeleteConversation(pb.DeleteConversationRequest(conversation_id="a b"), timeout=10)
    ) == (inv, "conversation_id")
    assert not stub.DeleteConversation(pb.DeleteConversationRequest(conversation_id="never-used"), timeout=10).deleted
    assert _code_and_field(lambda: stub.RenderTemplate(pb.TemplateInput(name="nope"), timeout=10)) == (nf, "")
    assert _code_and_field(lambda: stub.RenderTemplate(pb.TemplateInput(name="sentiment"), timeout=10)) == (
        inv,
        "variables.text",
    )
    models = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    assert any(m.name == "llm" and m.ready for m in models)


def _metric(mesh: Mesh, prefix: str) -> float:
    url = f"http://127.0.0.1:{mesh.cfg.triton.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(prefix))


def test_the_client_deadline_reaches_triton(stub, mesh: Mesh) -> None:
    # A seed whose generation runs to max_tokens, and how long that takes unhurried.
    for seed in range(50):
        req = pb.GenerateRequest(prompt="a long answer", sampling=sampling(max_tokens=1000, seed=seed))
        t0 = time.perf_counter()
        if stub.Generate(req, timeout=60).finish_reason == types_pb2.FINISH_REASON_LENGTH:
            full = time.perf_counter() - t0
            break
    else:
        pytest.fail("no seed ran to max_tokens")
    cancelled = 'llmesh_llm_requests_total{finish_reason="cancelled"'
    before = _metric(mesh, cancelled)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.GenerateStream(req, timeout=full / 4))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(50):  # Triton saw the deadline and stopped that request
        if _metric(mesh, cancelled) > before:
            break
        time.sleep(0.1)
    assert _metric(mesh, cancelled) > before


def test_a_slow_reader_gets_the_whole_text_in_order(stub) -> None:
    # Deltas are paced and coalesced (stream_interval_ms): a client that lags gets fewer,
    # longer deltas, never a lost or reordered one, and usage on the last message.
    req = pb.GenerateRequest(prompt="tell a story", sampling=sampling(max_tokens=64, seed=11, temperature=0.9))
    unary = stub.Generate(req, timeout=60)
    parts, last = [], None
    for msg in stub.GenerateStream(req, timeout=60):
        parts.append(msg.text_delta)
        last = msg
        time.sleep(0.05)
    assert last is not None and last.finish_reason == unary.finish_reason
    assert "".join(parts) == unary.text
    assert last.usage.completion_tokens == unary.usage.completion_tokens
