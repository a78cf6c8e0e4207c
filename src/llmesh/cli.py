"""The ``llmesh`` command: models, the embedded mesh (up/down/status/logs), and
calls against the running mesh (generate, chat, templates, demo).

Heavy imports (torch for ``models init``, the launcher) happen inside commands,
so ``llmesh --help`` and client calls start fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import grpc
import typer

from llmesh import cli_trainer
from llmesh.cli_common import ConfigOpt, _config, _fail, console, err
from llmesh.config import MeshConfig
from llmesh.runtime import files

app = typer.Typer(
    help="llmesh: serve, adapt and safely expose large models over gRPC.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Demo models under LLMESH_HOME/models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
audit_app = typer.Typer(help="The tamper-evident audit log (security service).", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
keys_app = typer.Typer(help="API keys (operators; talks to the security service on loopback).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
AddressOpt = Annotated[
    str | None, typer.Option("--address", help="host:port of the inference API (default: from config).")
]


def _address(cfg: MeshConfig, address: str | None) -> str:
    return address or files.address(cfg.inference.server.host, cfg.inference.server.port)


@models_app.command("init")
def models_init(
    config: ConfigOpt = None, force: Annotated[bool, typer.Option(help="Rebuild even if present.")] = False
) -> None:
    """Build the tiny demo models (Qwen2-style LM, CLIP) deterministically, offline."""
    from llmesh.demo.models import init_models

    cfg = _config(config)
    for name, path in init_models(cfg.home, force=force).items():
        console.print(f"{name}: {path}")


@app.command()
def up(
    config: ConfigOpt = None, timeout: Annotated[float, typer.Option(help="Seconds to wait for health.")] = 300
) -> None:
    """Start Redis, tritonserver and every service on 127.0.0.1, supervised; wait for health."""
    from llmesh.launcher import control

    cfg = _config(config)
    try:
        control.up(cfg, config_path=config, timeout=timeout)
    except control.LauncherError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from e
    control.render_status(control.status(cfg))


@app.command()
def down(config: ConfigOpt = None) -> None:
    """Stop the mesh gracefully (services first, then Triton, then Redis)."""
    from llmesh.launcher import control

    control.down(_config(config))  # "not running" is not an error: down is idempotent


@app.command()
def status(config: ConfigOpt = None) -> None:
    """A table of every process: state, live health, port, pid, restarts."""
    from llmesh.launcher import control

    control.render_status(control.status(_config(config)))


@app.command()
def logs(
    name: Annotated[
        str | None, typer.Argument(help="Process name (redis, tritonserver, inference, supervisor); all if omitted.")
    ] = None,
    lines: Annotated[int, typer.Option("-n", help="Lines to show.")] = 50,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing new lines.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Show the logs of the mesh's processes."""
    from llmesh.launcher import control

    try:
        control.logs(_config(config), name, lines=lines, follow=follow)
    except control.LauncherError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from e


def _finish(value: int) -> str:
    from llmesh.pb.common.v1 import types_pb2

    return types_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def _parse_vars(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep:
            raise typer.BadParameter(f"--var expects name=value, got {p!r}")
        out[k] = v
    return out


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(help="Prompt text (omit with --template).")] = None,
    stream: Annotated[bool, typer.Option("--stream", help="Print tokens as they arrive.")] = False,
    adapter: Annotated[str, typer.Option(help="LoRA adapter name (name or name@version).")] = "",
    template: Annotated[str | None, typer.Option(help="Template name (see `llmesh templates`).")] = None,
    var: Annotated[list[str], typer.Option("--var", help="Template variable name=value (repeatable).")] = [],
    max_tokens: Annotated[int | None, typer.Option()] = None,
    temperature: Annotated[float | None, typer.Option()] = None,
    top_p: Annotated[float | None, typer.Option()] = None,
    top_k: Annotated[int | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    stop: Annotated[list[str], typer.Option("--stop", help="Stop sequence (repeatable).")] = [],
    address: AddressOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Generate text from a prompt or a template."""
    from llmesh.client import InferenceClient, sampling
    from llmesh.pb.inference.v1 import inference_pb2 as pb

    s = sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop)
    if template:
        req = pb.GenerateRequest(
            template=pb.TemplateInput(name=template, variables=_parse_vars(var)), sampling=s, adapter=adapter
        )
    else:
        req = pb.GenerateRequest(prompt=prompt or "", sampling=s, adapter=adapter)
    cfg = _config(config)
    client = InferenceClient(_address(cfg, address), cfg.home)
    try:
        if stream:
            last = None
            for msg in client.generate_stream(req):
                sys.stdout.write(msg.text_delta)
                sys.stdout.flush()
                last = msg
            print()
            if last is not None:
                u = last.usage
                err.print(
                    f"[dim]finish={_finish(last.finish_reason)} "
                    f"prompt_tokens={u.prompt_tokens} completion_tokens={u.completion_tokens}[/dim]"
                )
        else:
            r = client.generate(req)
            print(r.text)
            err.print(
                f"[dim]finish={_finish(r.finish_reason)} prompt_tokens={r.usage.prompt_tokens} "
                f"completion_tokens={r.usage.completion_tokens}[/dim]"
            )
    except grpc.RpcError as e:
        _fail(e)
    finally:
        client.close()


def _chat_turn(client, conversation_id: str, message: str, adapter: str, system: str, max_tokens: int | None) -> str:  # type: ignore[no-untyped-def]
    from llmesh.client import sampling
    from llmesh.pb.inference.v1 import inference_pb2 as pb

    req = pb.ChatRequest(
        conversation_id=conversation_id,
        message=message,
        adapter=adapter,
        system_prompt=system,
        sampling=sampling(max_tokens=max_tokens),
    )
    cid = conversation_id
    for msg in client.chat_stream(req):
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


@app.command()
def chat(
    message: Annotated[str | None, typer.Argument(help="One message; omit for an interactive session.")] = None,
    conversation: Annotated[str, typer.Option("--conversation", help="Conversation id to continue.")] = "",
    system: Annotated[str, typer.Option(help="System prompt for this conversation.")] = "",
    adapter: Annotated[str, typer.Option(help="LoRA adapter name.")] = "",
    max_tokens: Annotated[int | None, typer.Option()] = None,
    address: AddressOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Chat with server-side memory (history kept per conversation id in Redis)."""
    from llmesh.client import InferenceClient

    cfg = _config(config)
    client = InferenceClient(_address(cfg, address), cfg.home)
    cid = conversation
    try:
        if message is not None:
            _chat_turn(client, cid, message, adapter, system, max_tokens)
            return
        err.print("[dim]empty line or Ctrl-D to quit[/dim]")
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                break
            if not line:
                break
            sys.stdout.write("llm> ")
            cid = _chat_turn(client, cid, line, adapter, system, max_tokens)
            system = ""
    except grpc.RpcError as e:
        _fail(e)
    finally:
        client.close()


@app.command()
def templates(address: AddressOpt = None, config: ConfigOpt = None) -> None:
    """List the prompt templates and their variables."""
    from rich.table import Table

    from llmesh.client import InferenceClient
    from llmesh.pb.inference.v1 import inference_pb2 as pb

    cfg = _config(config)
    client = InferenceClient(_address(cfg, address), cfg.home)
    try:
        resp = client.stub.ListTemplates(pb.ListTemplatesRequest(), timeout=10)
    except grpc.RpcError as e:
        _fail(e)
    table = Table("template", "variables", "description")
    for t in resp.templates:
        table.add_row(t.name, ", ".join(t.variables), t.description)
    console.print(table)


@app.command()
def demo(
    config: ConfigOpt = None, timeout: Annotated[float, typer.Option(help="Seconds to wait for health.")] = 300
) -> None:
    """The main job: bring the mesh up, show a streamed generation, a templated
    prompt and a chat turn, and leave the mesh running."""
    from llmesh.demo.job import run_demo

    raise typer.Exit(run_demo(_config(config), config, timeout))


def _security(config: Path | None, rpc: str, request: object, timeout: float = 10):  # type: ignore[no-untyped-def]
    """One call to the security service on this host; a failure exits with its status."""
    from llmesh.client import local_channel
    from llmesh.pb.security.v1 import security_pb2_grpc

    cfg = _config(config)
    s = cfg.security.server
    stub = security_pb2_grpc.SecurityStub(local_channel(files.address(s.host, s.port), cfg.home))
    try:
        return getattr(stub, rpc)(request, timeout=timeout)
    except grpc.RpcError as e:
        _fail(e)


@keys_app.command("create")
def keys_create(
    owner: Annotated[str, typer.Option(help="Who the key is for (the token's subject).")],
    scope: Annotated[list[str], typer.Option("--scope", help="Scope, e.g. inference:* (repeatable).")],
    tenant: Annotated[str, typer.Option(help="Tenant the key belongs to.")] = "default",
    role: Annotated[list[str], typer.Option("--role", help="Role (repeatable).")] = [],
    ttl_days: Annotated[int, typer.Option(help="Days until the key expires (0: never).")] = 0,
    config: ConfigOpt = None,
) -> None:
    """Create an API key; the secret is printed once."""
    from llmesh.pb.security.v1 import security_pb2 as spb

    request = spb.CreateApiKeyRequest(owner=owner, tenant=tenant, scopes=scope, roles=role, ttl_days=ttl_days)
    r = _security(config, "CreateApiKey", request)
    print(f"key_id={r.key.key_id}")
    print(f"secret={r.secret}")
    err.print("[yellow]the secret is shown only now: store it safely[/yellow]")


@keys_app.command("list")
def keys_list(
    owner: Annotated[str, typer.Option(help="Only this owner's keys.")] = "", config: ConfigOpt = None
) -> None:
    """List API keys (never their secrets)."""
    from rich.table import Column, Table

    from llmesh.pb.security.v1 import security_pb2 as spb

    r = _security(config, "ListApiKeys", spb.ListApiKeysRequest(owner=owner))
    table = Table("owner", "tenant", "scopes", "roles", "revoked")
    table.columns.insert(0, Column("key_id", no_wrap=True, min_width=35))
    for k in r.keys:
        table.add_row(k.key_id, k.owner, k.tenant, " ".join(k.scopes), " ".join(k.roles), "yes" if k.revoked else "")
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str, config: ConfigOpt = None) -> None:
    """Revoke an API key (the gateway refuses it within its 30 s secret cache)."""
    from llmesh.pb.security.v1 import security_pb2 as spb

    _security(config, "RevokeApiKey", spb.RevokeApiKeyRequest(key_id=key_id))
    print(f"revoked {key_id}")


@audit_app.command("verify")
def audit_verify(config: ConfigOpt = None) -> None:
    """Recompute the audit hash chain; exit 1 and name the first bad record if it was tampered with."""
    from llmesh.pb.security.v1 import security_pb2 as spb

    r = _security(config, "VerifyAuditChain", spb.VerifyAuditChainRequest(), timeout=60)
    if r.intact:
        print(f"intact: {r.records} records")
        return
    print(f"TAMPERED: first bad record {r.first_bad_sequence} of {r.records}: {r.detail}")
    raise typer.Exit(1)


@audit_app.command("query")
def audit_query(
    actor: Annotated[str, typer.Option(help="Only this principal.")] = "",
    action: Annotated[str, typer.Option(help="Only this method, e.g. /llmesh.inference.v1.Inference/Chat.")] = "",
    limit: Annotated[int, typer.Option(help="At most this many records.")] = 20,
    config: ConfigOpt = None,
) -> None:
    """Show audit records (masked summaries only: the log never holds raw PII)."""
    from llmesh.pb.security.v1 import security_pb2 as spb

    r = _security(config, "QueryAudit", spb.QueryAuditRequest(actor=actor, action=action, limit=limit), timeout=30)
    for rec in r.records:
        attrs = " ".join(f"{k}={v}" for k, v in sorted(rec.attributes.items()))
        print(f"{rec.sequence:>6} {rec.time.ToJsonString()} {rec.actor} {rec.action} {rec.outcome} {attrs}")


@app.command()
def token(
    key_id: Annotated[str, typer.Option(help="API key id.")],
    secret: Annotated[str, typer.Option(help="API key secret.", envvar="LLMESH_API_SECRET")],
    scope: Annotated[list[str], typer.Option("--scope", help="Narrow the token to these scopes.")] = [],
    config: ConfigOpt = None,
) -> None:
    """Exchange an API key for a short-lived JWT (printed on stdout)."""
    from llmesh.pb.security.v1 import security_pb2 as spb

    r = _security(config, "IssueToken", spb.IssueTokenRequest(key_id=key_id, secret=secret, scopes=scope))
    print(r.token)


# --- compliance ---------------------------------------------------------------------
compliance_app = typer.Typer(help="GDPR/HIPAA-style checks of the running mesh, with evidence.", no_args_is_help=True)
app.add_typer(compliance_app, name="compliance")

_STATUS_STYLE = {"pass": "green", "warn": "yellow", "fail": "red"}


@compliance_app.command("report")
def compliance_report(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Derive each check from the configuration and live probes; exit 1 if any check fails."""
    import json

    from rich.markup import escape
    from rich.table import Column, Table

    from llmesh.compliance import run_checks

    checks = run_checks(_config(config))
    if as_json:
        counts = {s: sum(c.status == s for c in checks) for s in _STATUS_STYLE}
        print(json.dumps({"checks": [c.to_dict() for c in checks], "counts": counts}, ensure_ascii=False, indent=1))
    else:
        # fold, not ellipsis: a long field name or address must stay readable in full.
        table = Table(
            "check", "status", Column("evidence", overflow="fold"), title="llmesh compliance report", show_lines=True
        )
        for c in checks:
            # Evidence holds "[::1]:port" and "upstreams[...]": literal text, not markup.
            table.add_row(c.title, f"[{_STATUS_STYLE[c.status]}]{c.status}[/]", escape("\n".join(c.evidence)))
        console.print(table)
    if any(c.status == "fail" for c in checks):
        raise typer.Exit(1)


cli_trainer.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
