"""Client commands of the inference API: generate, chat, templates. Through the gateway
when an API key is configured, else straight to this host's inference service."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from llmesh.cli.common import (
    Access,
    ApiKeyFileOpt,
    ConfigOpt,
    GatewayOpt,
    LocalOpt,
    channel_for,
    console,
    err,
    mesh_config,
)
from llmesh.config import MeshConfig

if TYPE_CHECKING:  # the generated modules load when a command runs: --help stays fast
    from llmesh.pb.inference.v1 import inference_pb2 as pb_types
    from llmesh.pb.inference.v1 import inference_pb2_grpc as pb_grpc

AddressOpt = Annotated[
    str | None,
    typer.Option("--address", help="host:port of the inference service, without a key (default: from config)."),
]


def stub(cfg: MeshConfig, access: Access, address: str | None) -> pb_grpc.InferenceStub:
    from llmesh.pb.inference.v1 import inference_pb2_grpc as pb_grpc

    return pb_grpc.InferenceStub(channel_for(cfg, cfg.inference.server, access, address))


def finish_name(value: int) -> str:
    from llmesh.pb.common.v1 import types_pb2

    return types_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()  # type: ignore[arg-type]  # an enum value off the wire


def parse_vars(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep:
            raise typer.BadParameter(f"--var expects name=value, got {p!r}")
        out[k] = v
    return out


def response_format(json_schema: str | None, choice: str | None, regex: str | None) -> pb_types.ResponseFormat | None:
    """--json-schema FILE|JSON, --choice A,B,C, --regex RE → a ResponseFormat (at most one)."""
    import pathlib

    from llmesh.pb.inference.v1 import inference_pb2 as pb

    if sum(x is not None for x in (json_schema, choice, regex)) > 1:
        raise typer.BadParameter("give at most one of --json-schema, --choice, --regex")
    if json_schema is not None:
        path = pathlib.Path(json_schema)
        text = json_schema if json_schema.lstrip().startswith(("{", "[")) or not path.is_file() else path.read_text()
        return pb.ResponseFormat(json_schema=text)
    if choice is not None:
        return pb.ResponseFormat(choice=pb.ChoiceList(choices=[c.strip() for c in choice.split(",") if c.strip()]))
    if regex is not None:
        return pb.ResponseFormat(regex=regex)
    return None


def print_structured(msg: pb_types.GenerateResponse | pb_types.GenerateStreamResponse) -> None:
    """The structured verdict and, for a choice list, every choice's probability."""
    if not msg.HasField("structured"):
        return
    st = msg.structured
    err.print(f"[dim]structured valid={str(st.valid).lower()}[/dim]")
    for c in st.choices:
        err.print(f"[dim]  {c.probability:7.2%}  {c.choice}[/dim]")


def generate(
    prompt: Annotated[str | None, typer.Argument(help="Prompt text (omit with --template).")] = None,
    stream: Annotated[bool, typer.Option("--stream", help="Print tokens as they arrive.")] = False,
    adapter: Annotated[str, typer.Option(help="LoRA adapter name (name or name@version).")] = "",
    template: Annotated[str | None, typer.Option(help="Template name (see `llmesh templates`).")] = None,
    var: Annotated[list[str], typer.Option("--var", help="Template variable name=value (repeatable).")] = [],  # noqa: B006  # typer reads the default, never mutates it
    max_tokens: Annotated[int | None, typer.Option()] = None,
    temperature: Annotated[float | None, typer.Option()] = None,
    top_p: Annotated[float | None, typer.Option()] = None,
    top_k: Annotated[int | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    stop: Annotated[list[str], typer.Option("--stop", help="Stop sequence (repeatable).")] = [],  # noqa: B006  # (same)
    json_schema: Annotated[
        str | None, typer.Option("--json-schema", help="Answer as JSON valid against this schema (file or JSON).")
    ] = None,
    choice: Annotated[
        str | None, typer.Option("--choice", help="Answer with one of A,B,C (shows each one's probability).")
    ] = None,
    regex: Annotated[str | None, typer.Option("--regex", help="Answer matching this regular expression.")] = None,
    address: AddressOpt = None,
    gateway: GatewayOpt = None,
    api_key_file: ApiKeyFileOpt = None,
    local: LocalOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Generate text from a prompt or a template (optionally constrained to a format)."""
    from llmesh.client.sampling import sampling
    from llmesh.pb.inference.v1 import inference_pb2 as pb

    s = sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop)
    if template:
        req = pb.GenerateRequest(
            template=pb.TemplateInput(name=template, variables=parse_vars(var)), sampling=s, adapter=adapter
        )
    else:
        req = pb.GenerateRequest(prompt=prompt or "", sampling=s, adapter=adapter)
    if (fmt := response_format(json_schema, choice, regex)) is not None:
        req.response_format.CopyFrom(fmt)
    cfg = mesh_config(config)
    client = stub(cfg, Access(gateway, api_key_file, local), address)
    if stream:
        last = None
        for msg in client.GenerateStream(req, timeout=120):
            sys.stdout.write(msg.text_delta)
            sys.stdout.flush()
            last = msg
        print()
        if last is not None:
            u = last.usage
            err.print(
                f"[dim]finish={finish_name(last.finish_reason)} "
                f"prompt_tokens={u.prompt_tokens} completion_tokens={u.completion_tokens}[/dim]"
            )
            print_structured(last)
    else:
        r = client.Generate(req, timeout=120)
        print(r.text)
        err.print(
            f"[dim]finish={finish_name(r.finish_reason)} prompt_tokens={r.usage.prompt_tokens} "
            f"completion_tokens={r.usage.completion_tokens}[/dim]"
        )
        print_structured(r)


def chat_turn(
    client: pb_grpc.InferenceStub, conversation_id: str, message: str, adapter: str, system: str, max_tokens: int | None
) -> str:
    """One streamed turn; returns the conversation id (new on the first turn)."""
    from llmesh.client.sampling import sampling
    from llmesh.pb.inference.v1 import inference_pb2 as pb

    req = pb.ChatRequest(
        conversation_id=conversation_id,
        message=message,
        adapter=adapter,
        system_prompt=system,
        sampling=sampling(max_tokens=max_tokens),
    )
    cid = conversation_id
    for msg in client.ChatStream(req, timeout=120):
        cid = msg.conversation_id
        sys.stdout.write(msg.text_delta)
        sys.stdout.flush()
        if msg.finish_reason:
            print()
            err.print(
                f"[dim]conversation={cid} history={msg.history_length} "
                f"tokens={msg.usage.prompt_tokens}+{msg.usage.completion_tokens}[/dim]"
            )
    return cid


def chat(
    message: Annotated[str | None, typer.Argument(help="One message; omit for an interactive session.")] = None,
    conversation: Annotated[str, typer.Option("--conversation", help="Conversation id to continue.")] = "",
    system: Annotated[str, typer.Option(help="System prompt for this conversation.")] = "",
    adapter: Annotated[str, typer.Option(help="LoRA adapter name.")] = "",
    max_tokens: Annotated[int | None, typer.Option()] = None,
    address: AddressOpt = None,
    gateway: GatewayOpt = None,
    api_key_file: ApiKeyFileOpt = None,
    local: LocalOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Chat with server-side memory (history kept per conversation id in Redis)."""
    cfg = mesh_config(config)
    client = stub(cfg, Access(gateway, api_key_file, local), address)
    if message is not None:
        chat_turn(client, conversation, message, adapter, system, max_tokens)
        return
    cid = conversation
    err.print("[dim]empty line or Ctrl-D to quit[/dim]")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        sys.stdout.write("llm> ")
        cid = chat_turn(client, cid, line, adapter, system, max_tokens)
        system = ""


def templates(
    address: AddressOpt = None,
    gateway: GatewayOpt = None,
    api_key_file: ApiKeyFileOpt = None,
    local: LocalOpt = False,
    config: ConfigOpt = None,
) -> None:
    """List the prompt templates and their variables."""
    from rich.table import Table

    from llmesh.pb.inference.v1 import inference_pb2 as pb

    cfg = mesh_config(config)
    resp = stub(cfg, Access(gateway, api_key_file, local), address).ListTemplates(pb.ListTemplatesRequest(), timeout=10)
    table = Table("template", "variables", "description")
    for t in resp.templates:
        table.add_row(t.name, ", ".join(t.variables), t.description)
    console.print(table)


def register(app: typer.Typer) -> None:
    for command in (generate, chat, templates):
        app.command()(command)
