"""The main job on the embedded default: the mesh comes up and shows what it does,
every call going through the gateway with an API key the demo creates."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import grpc
from rich.console import Console
from rich.panel import Panel

from llmesh.client import (
    ApiKey,
    ApiKeyError,
    describe_error,
    gateway_channel,
    local_channel,
    read_api_key_file,
    sampling,
)
from llmesh.client.trainer import upload, watch
from llmesh.config import MeshConfig
from llmesh.demo.catalog import TEST_LM
from llmesh.pb.common.v1 import types_pb2
from llmesh.pb.inference.v1 import inference_pb2 as pb
from llmesh.pb.inference.v1 import inference_pb2_grpc as pb_grpc
from llmesh.pb.security.v1 import security_pb2, security_pb2_grpc
from llmesh.pb.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from llmesh.runtime.files import address, write_secret
from llmesh.runtime.identity import Principal

console = Console()
DEMO_TENANT = "demo"

NEXT_STEPS = """\
The mesh is running (127.0.0.1 only). The demo's API key is in {key_file} (0600).
The CLI as a client, through the gateway ({gateway}) with that key (signed, rate-limited, audited):
  export LLMESH_API_KEY_FILE={key_file}
  llmesh generate "你好" --stream                 stream tokens
  llmesh chat                                    interactive chat with server-side memory
  llmesh adapters list                           the adapter registry (versions, aliases, evaluation)
  llmesh train my.jsonl --name my-adapter --watch    a LoRA job on your own data
Your own key and first call from Python:
  llmesh keys create --owner me --scope 'inference:*'       prints key_id=... and secret=... (once)
  python - <<'PY'
  from llmesh.client import ApiKey, gateway_channel
  from llmesh.pb.inference.v1 import inference_pb2 as pb, inference_pb2_grpc as pb_grpc
  stub = pb_grpc.InferenceStub(gateway_channel("{gateway}", ApiKey("KEY_ID", "SECRET")))
  print(stub.Generate(pb.GenerateRequest(prompt="我的手机号是13812348000"), timeout=60).text)
  PY
Operator commands on this host (no key: straight to the services):
  llmesh status                                  every process, health, port, pid
  llmesh audit query --limit 10                  the audit trail of the calls above
  llmesh compliance report                       checks of the running configuration, with evidence
  grpcurl -plaintext {gateway} list        the public API by reflection
  llmesh down                                    stop everything
{about_lm}"""
REAL_LM_NOTE = """The LM is {model}: a small demonstration model (short English answers, shallow facts, weak
Chinese and translation). Point triton.llm_path at a bigger folder for more (README, "Models")."""
TEST_LM_NOTE = """The LM is the random-weight test LM (triton.llm_model: tiny-qwen2): its text is noise; the faq
adapter above has memorised the bundled FAQ. The default LM answers for real (README, "Models")."""

DEMO_SCOPES = ["inference:*", "trainer:*"]
# The trainer's defaults: 20 FAQ rows are memorised (150 steps, batch 1, lr 1e-3, LoRA r=16;
# ~2 min of training on SmolLM2 on 2 cores).
FAQ_JOB = trainer_pb2.CreateJobRequest(seed=1)
# The random test LM (triton.llm_model: tiny-qwen2) learns nothing in 150 steps at lr 1e-3:
# from random weights the FAQ takes a larger step size and more epochs (the e2e trainer
# tests train it with these too).
RANDOM_LM_FAQ_JOB = trainer_pb2.CreateJobRequest(
    lora=trainer_pb2.LoraConfig(rank=16), epochs=60, learning_rate=3e-3, batch_size=4, max_length=192, seed=1
)


def serves_test_lm(cfg: MeshConfig) -> bool:
    return not cfg.triton.llm_path and cfg.triton.llm_model == TEST_LM


def faq_job(cfg: MeshConfig) -> trainer_pb2.CreateJobRequest:
    """The FAQ job for the LM this mesh serves."""
    return RANDOM_LM_FAQ_JOB if serves_test_lm(cfg) else FAQ_JOB


def about_lm(cfg: MeshConfig) -> str:
    if serves_test_lm(cfg):
        return TEST_LM_NOTE
    return REAL_LM_NOTE.format(model=cfg.triton.llm_path or cfg.triton.llm_model)


PII_PROMPT = (
    "Hi, my phone is 13812348000 and my email is zhang.san@example.com. I forgot my VPN password, what should I do?"
)
FOLLOW_UP = "Thanks. Who should I contact if that does not work?"


class DemoFailed(Exception):
    """A step of the demo did not do what it shows; the message says which and where to look."""


def _section(title: str) -> None:
    console.rule(f"[bold]{title}")


def demo_key_file(cfg: MeshConfig) -> Path:
    """Where the demo keeps its API key: the file ``--api-key-file`` reads."""
    return cfg.home / "demo" / "api-key.json"


def demo_key(cfg: MeshConfig) -> ApiKey:
    """The demo's API key: created once through the security service and kept in
    ``LLMESH_HOME/demo/api-key.json`` (0600); a revoked, lost or unreadable one is replaced."""
    path = demo_key_file(cfg)
    security = security_pb2_grpc.SecurityStub(
        local_channel(address(cfg.security.server.host, cfg.security.server.port), cfg.home)
    )
    if path.is_file():
        try:
            saved = read_api_key_file(path)
            issued = security.IssueToken(
                security_pb2.IssueTokenRequest(key_id=saved.key_id, secret=saved.secret), timeout=10
            )
            if set(issued.scopes) == set(DEMO_SCOPES):
                return saved
        except (ApiKeyError, grpc.RpcError):
            pass  # malformed, revoked, expired or from another mesh: make a new one
    created = security.CreateApiKey(
        security_pb2.CreateApiKeyRequest(owner="demo", tenant=DEMO_TENANT, scopes=DEMO_SCOPES, roles=["user"]),
        timeout=10,
    )
    write_secret(path, json.dumps({"key_id": created.key.key_id, "secret": created.secret}))
    return ApiKey(created.key.key_id, created.secret)


def run_demo(cfg: MeshConfig, config_path: Path | None, timeout: float) -> int:
    from llmesh.launcher import control
    from llmesh.launcher.processes import LauncherError

    if not cfg.triton.llm_path and not (cfg.llm_path / "config.json").is_file():
        from llmesh.demo.models import init_models

        console.print("building demo models ...")
        init_models(cfg.home, llm=cfg.triton.llm_model)
    try:
        control.up(cfg, config_path=config_path, timeout=timeout)
    except LauncherError as e:
        console.print(f"[red]{e}[/red]")
        return 1
    control.render_status(control.status(cfg))
    gateway = address(cfg.gateway.server.host, cfg.gateway.server.port)
    try:
        key = demo_key(cfg)
        console.print(
            f"API key [bold]{key.key_id}[/bold] (tenant {DEMO_TENANT}, scopes {' '.join(DEMO_SCOPES)}); "
            f"every call below goes through the gateway {gateway}: JWT from Security/IssueToken, "
            "HMAC signature, scope check, rate limits, PII masking, audit"
        )
        channel = gateway_channel(gateway, key)
        show(cfg, pb_grpc.InferenceStub(channel))
        adapt(pb_grpc.InferenceStub(channel), trainer_pb2_grpc.TrainerStub(channel), faq_job(cfg))
        channel.close()
    except grpc.RpcError as e:
        console.print(f"[red]{describe_error(e)}[/red]")
        return 1
    except DemoFailed as e:
        console.print(f"[red]{e}[/red]")
        return 1
    _section("next")
    print(NEXT_STEPS.format(gateway=gateway, key_file=demo_key_file(cfg), about_lm=about_lm(cfg)))
    return 0


def live_adapter(trainer: trainer_pb2_grpc.TrainerStub, name: str) -> trainer_pb2.Adapter | None:
    """``name@live``, or None while there is none."""
    try:
        return trainer.GetAdapter(trainer_pb2.GetAdapterRequest(ref=f"{name}@live"), timeout=10)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return None


def adapt(
    inference: pb_grpc.InferenceStub, trainer: trainer_pb2_grpc.TrainerStub, options: trainer_pb2.CreateJobRequest
) -> None:
    """Train a LoRA adapter on the bundled FAQ (once), publish it as faq@live, and
    compare the answers of the base model and the adapter."""
    from llmesh.demo.models import faq_pairs

    _section("LoRA adapter trained on the bundled FAQ (trainer service, published without a Triton restart)")
    pairs = faq_pairs()
    live = live_adapter(trainer, "faq")
    if live is not None:
        console.print(f"already trained and live: {live.ref} (job {live.job_id})")
    else:
        ds = upload(trainer, json.dumps(pairs, ensure_ascii=False).encode(), "faq.json", eval_fraction=0.1, seed=3)
        console.print(f"dataset {ds.dataset_id}: {ds.train_examples} train + {ds.eval_examples} held-out pairs")
        request = trainer_pb2.CreateJobRequest(dataset_id=ds.dataset_id, adapter_name="faq")
        request.MergeFrom(options)
        job = watch(trainer, trainer.CreateJob(request, timeout=30).job_id, console)
        if job.state != trainer_pb2.JOB_STATE_SUCCEEDED:
            raise DemoFailed(f"training the faq adapter failed: {job.error} (llmesh logs trainer)")
        console.print(
            f"held-out loss: base {job.base.loss:.2f} → adapter {job.tuned.loss:.2f} "
            f"(perplexity {job.base.perplexity:.0f} → {job.tuned.perplexity:.0f})"
        )
        live = trainer.PromoteAdapter(trainer_pb2.PromoteAdapterRequest(ref=job.adapter), timeout=30)
        console.print(f"published {live.ref} and promoted it to faq@live")
    greedy = sampling(temperature=0.0, max_tokens=120)
    for pair in (pairs[1], pairs[0]):
        before = inference.Chat(pb.ChatRequest(message=pair["question"], sampling=greedy), timeout=120).reply.content
        after = inference.Chat(
            pb.ChatRequest(message=pair["question"], adapter="faq", sampling=greedy), timeout=120
        ).reply.content
        console.print(f"Q: {pair['question']}", markup=False, soft_wrap=True)
        console.print(f"   base model:   {before.strip()[:100]!r}", markup=False, soft_wrap=True)
        console.print(f"   adapter faq:  {after.strip()[:100]!r}", markup=False, soft_wrap=True)


def show(cfg: MeshConfig, stub: pb_grpc.InferenceStub) -> None:
    stream_section(stub)
    template_section(stub)
    chat_section(cfg, stub)
    extraction_section(stub)
    audit_section(cfg)


def stream_section(stub: pb_grpc.InferenceStub) -> None:
    _section("streamed generation (GenerateStream; the prompt goes in the model's chat template)")
    prompt = "How do I reset my password?"
    console.print(f"prompt: {prompt}")
    last = None
    for msg in stub.GenerateStream(
        pb.GenerateRequest(prompt=prompt, sampling=sampling(max_tokens=80, temperature=0.0)), timeout=180
    ):
        sys.stdout.write(msg.text_delta)
        sys.stdout.flush()
        last = msg
    print()
    if last is not None:
        console.print(
            f"[dim]usage: {last.usage.prompt_tokens} prompt + {last.usage.completion_tokens} completion tokens, "
            f"finish {types_pb2.FinishReason.Name(last.finish_reason)}[/dim]"
        )


def template_section(stub: pb_grpc.InferenceStub) -> None:
    _section("server-side templates: translation, and classification with every category's probability")
    variables = {"text": "今天天气很好", "source_lang": "Chinese", "target_lang": "English"}
    rendered = stub.RenderTemplate(pb.TemplateInput(name="translation", variables=variables), timeout=10)
    console.print(Panel(rendered.prompt, title="rendered prompt (template 'translation')"))
    r = stub.Generate(
        pb.GenerateRequest(
            template=pb.TemplateInput(name="translation", variables=variables),
            sampling=sampling(max_tokens=32, temperature=0.0),
        ),
        timeout=180,
    )
    console.print(f"translation: {r.text.strip()!r}  [dim]({r.usage.total_tokens} tokens)[/dim]")
    ticket = "I was charged twice for my subscription this month."
    categories = "account, billing, technical, complaint"
    c = stub.Generate(
        pb.GenerateRequest(
            template=pb.TemplateInput(name="classification", variables={"text": ticket, "categories": categories})
        ),
        timeout=180,
    )
    odds = ", ".join(f"{p.choice} {p.probability:.2f}" for p in c.structured.choices)
    console.print(f"classify {ticket!r} → [bold]{c.text}[/bold]  ({odds})")


def chat_section(cfg: MeshConfig, stub: pb_grpc.InferenceStub) -> None:
    _section("chat with server-side memory; PII masked before the model (Chat, two turns)")
    greedy = sampling(max_tokens=64, temperature=0.0)
    first = stub.Chat(
        pb.ChatRequest(message=PII_PROMPT, system_prompt="You are a helpful IT helpdesk assistant.", sampling=greedy),
        timeout=180,
    )
    console.print(f"you sent:        {PII_PROMPT}", markup=False)
    # What the model saw, read straight from the inference service as an operator of the same tenant.
    operator = Principal("demo-operator", DEMO_TENANT, frozenset({"inference:read", "inference:chat"}))
    direct = pb_grpc.InferenceStub(
        local_channel(address(cfg.inference.server.host, cfg.inference.server.port), cfg.home, operator)
    )
    stored = direct.GetConversation(pb.GetConversationRequest(conversation_id=first.conversation_id), timeout=10)
    seen = next(m.content for m in stored.messages if m.role == types_pb2.ROLE_USER)
    console.print(f"the model saw:   {seen}", markup=False)
    console.print(f"reply: {first.reply.content.strip()!r}", markup=False, soft_wrap=True)
    console.print("[dim](placeholders in replies are restored for you)[/dim]")
    second = stub.Chat(
        pb.ChatRequest(conversation_id=first.conversation_id, message=FOLLOW_UP, sampling=greedy), timeout=180
    )
    console.print(f"you: {FOLLOW_UP}", markup=False)
    console.print(f"reply: {second.reply.content.strip()!r}", markup=False, soft_wrap=True)
    console.print(f"[dim]conversation {second.conversation_id}: {second.history_length} messages kept[/dim]")


def extraction_section(stub: pb_grpc.InferenceStub) -> None:
    _section("structured extraction (template 'entity_extraction': JSON schema enforced while decoding)")
    text = "Zhang Wei from Huawei met Li Na in Shanghai to plan the new Alibaba office."
    r = stub.Generate(
        pb.GenerateRequest(template=pb.TemplateInput(name="entity_extraction", variables={"text": text})),
        timeout=180,
    )
    console.print(f"text: {text}", markup=False)
    console.print(f"JSON: {r.text}", markup=False, soft_wrap=True)
    if r.structured.valid:
        found = json.loads(r.text)
        console.print(f"valid against the schema: {', '.join(f'{k}={v}' for k, v in found.items())}", markup=False)
    else:
        console.print(f"not valid (finish {types_pb2.FinishReason.Name(r.finish_reason)}): cut by max_tokens")


def audit_section(cfg: MeshConfig) -> None:
    _section("audit trail (security service, hash-chained)")
    security = security_pb2_grpc.SecurityStub(
        local_channel(address(cfg.security.server.host, cfg.security.server.port), cfg.home)
    )
    deadline = time.monotonic() + 5
    records: list[security_pb2.AuditRecord] = []
    while time.monotonic() < deadline and len(records) < 4:  # the gateway sends audit in batches
        records = list(
            security.QueryAudit(security_pb2.QueryAuditRequest(actor="demo", limit=1000), timeout=10).records
        )[-4:]
        time.sleep(0.3)
    for rec in records:
        console.print(
            f"{rec.sequence:>6} {rec.actor} {rec.action.rsplit('/', 1)[-1]:<16} {rec.outcome:<3} "
            f"pii=[{rec.attributes.get('pii', '')}] latency={rec.attributes.get('latency_ms')} ms",
            markup=False,
        )
    chain = security.VerifyAuditChain(security_pb2.VerifyAuditChainRequest(), timeout=60)
    console.print(f"chain intact: {chain.intact} ({chain.records} records)")
