"""Security commands: API keys, the audit log and compliance (operators, on the mesh's
host, straight to the security service) and ``token`` (a client: through the gateway)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from llmesh.cli.common import (
    Access,
    ApiKeyFileOpt,
    ConfigOpt,
    GatewayOpt,
    LocalOpt,
    Target,
    channel_for,
    console,
    err,
    fail,
    mesh_config,
    remember,
)
from llmesh.client.keys import ENV_KEY_ID, ENV_SECRET, ApiKey

if TYPE_CHECKING:
    from llmesh.pb.security.v1 import security_pb2_grpc

keys_app = typer.Typer(help="API keys (operators; talks to the security service on loopback).", no_args_is_help=True)
audit_app = typer.Typer(help="The tamper-evident audit log (security service).", no_args_is_help=True)
compliance_app = typer.Typer(help="GDPR/HIPAA-style checks of the running mesh, with evidence.", no_args_is_help=True)

STATUS_STYLE = {"pass": "green", "warn": "yellow", "fail": "red"}


def security(config: Path | None) -> security_pb2_grpc.SecurityStub:
    """The security service on this host, as its operator (never through a key)."""
    from llmesh.pb.security.v1 import security_pb2_grpc

    cfg = mesh_config(config)
    return security_pb2_grpc.SecurityStub(channel_for(cfg, cfg.security.server, Access(local=True)))


@keys_app.command("create")
def keys_create(
    owner: Annotated[str, typer.Option(help="Who the key is for (the token's subject).")],
    scope: Annotated[list[str], typer.Option("--scope", help="Scope, e.g. inference:* (repeatable).")],
    tenant: Annotated[str, typer.Option(help="Tenant the key belongs to.")] = "default",
    role: Annotated[list[str], typer.Option("--role", help="Role (repeatable).")] = [],  # noqa: B006  # typer reads the default, never mutates it
    ttl_days: Annotated[int, typer.Option(help="Days until the key expires (0: never).")] = 0,
    config: ConfigOpt = None,
) -> None:
    """Create an API key; the secret is printed once."""
    from llmesh.pb.security.v1 import security_pb2 as spb

    request = spb.CreateApiKeyRequest(owner=owner, tenant=tenant, scopes=scope, roles=role, ttl_days=ttl_days)
    r = security(config).CreateApiKey(request, timeout=10)
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

    r = security(config).ListApiKeys(spb.ListApiKeysRequest(owner=owner), timeout=10)
    table = Table("owner", "tenant", "scopes", "roles", "revoked")
    table.columns.insert(0, Column("key_id", no_wrap=True, min_width=35))
    for k in r.keys:
        table.add_row(k.key_id, k.owner, k.tenant, " ".join(k.scopes), " ".join(k.roles), "yes" if k.revoked else "")
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str, config: ConfigOpt = None) -> None:
    """Revoke an API key (the gateway refuses it within its 30 s secret cache)."""
    from llmesh.pb.security.v1 import security_pb2 as spb

    security(config).RevokeApiKey(spb.RevokeApiKeyRequest(key_id=key_id), timeout=10)
    print(f"revoked {key_id}")


@audit_app.command("verify")
def audit_verify(config: ConfigOpt = None) -> None:
    """Recompute the audit hash chain; exit 1 and name the first bad record if it was tampered with."""
    from llmesh.pb.security.v1 import security_pb2 as spb

    r = security(config).VerifyAuditChain(spb.VerifyAuditChainRequest(), timeout=60)
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

    request = spb.QueryAuditRequest(actor=actor, action=action, limit=limit)
    for rec in security(config).QueryAudit(request, timeout=30).records:
        attrs = " ".join(f"{k}={v}" for k, v in sorted(rec.attributes.items()))
        print(f"{rec.sequence:>6} {rec.time.ToJsonString()} {rec.actor} {rec.action} {rec.outcome} {attrs}")


def token(
    key_id: Annotated[str, typer.Option(help=f"API key id (default: the configured key, {ENV_KEY_ID}).")] = "",
    secret: Annotated[str, typer.Option(help=f"API key secret (or {ENV_SECRET}).", envvar=ENV_SECRET)] = "",
    scope: Annotated[list[str], typer.Option("--scope", help="Narrow the token to these scopes.")] = [],  # noqa: B006  # typer reads the default, never mutates it
    gateway: GatewayOpt = None,
    api_key_file: ApiKeyFileOpt = None,
    local: LocalOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Exchange an API key for a short-lived JWT (printed on stdout).

    Through the gateway; --local: straight to this host's security service."""
    import grpc

    from llmesh.client.local import local_channel
    from llmesh.pb.security.v1 import security_pb2 as spb
    from llmesh.pb.security.v1 import security_pb2_grpc
    from llmesh.runtime.channels import channel_options

    cfg = mesh_config(config)
    key = ApiKey(key_id, secret) if key_id else Access(gateway, api_key_file).key()
    if key is None or not key.secret:
        fail(f"no API key: pass --key-id and --secret, --api-key-file FILE, or set {ENV_KEY_ID} and {ENV_SECRET}", 2)
    if local:
        target = Target(cfg.security.server.local_address, via_gateway=False)
        channel = local_channel(target.address, cfg.home)
    else:  # IssueToken is anonymous at the gateway (the secret is in the body): a plain channel
        target = Target(gateway or cfg.gateway.server.local_address, via_gateway=True)
        channel = grpc.insecure_channel(target.address, options=channel_options(retries=False))
    remember(target)
    request = spb.IssueTokenRequest(key_id=key.key_id, secret=key.secret, scopes=scope)
    print(security_pb2_grpc.SecurityStub(channel).IssueToken(request, timeout=10).token)


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

    checks = run_checks(mesh_config(config))
    if as_json:
        counts = {s: sum(c.status == s for c in checks) for s in STATUS_STYLE}
        print(json.dumps({"checks": [c.to_dict() for c in checks], "counts": counts}, ensure_ascii=False, indent=1))
    else:
        # fold, not ellipsis: a long field name or address must stay readable in full.
        table = Table(
            "check", "status", Column("evidence", overflow="fold"), title="llmesh compliance report", show_lines=True
        )
        for c in checks:
            # Evidence holds "[::1]:port" and "upstreams[...]": literal text, not markup.
            table.add_row(c.title, f"[{STATUS_STYLE[c.status]}]{c.status}[/]", escape("\n".join(c.evidence)))
        console.print(table)
    if any(c.status == "fail" for c in checks):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
    app.add_typer(keys_app, name="keys")
    app.command()(token)
    app.add_typer(compliance_app, name="compliance")
