"""``llmesh compliance report``: GDPR/HIPAA-style checks derived from the mesh's actual
configuration, its files under ``LLMESH_HOME`` and live probes of the running processes.

Nothing here is a hard-coded answer: every line of evidence says what was read or asked
(a config key, a file mode, a database column, a Redis ``CONFIG GET``, an RPC and its
status code), so a reviewer can repeat it by hand. A probe that cannot run (the mesh is
down) fails its check and says so; the report itself never crashes. Read-only
throughout: no file is created (not even ``internal.key``) and nothing is written.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import grpc
import psutil
import redis
from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor

from llmesh.client import describe_error, local_channel
from llmesh.launcher.health import DOWN, probe_grpc
from llmesh.launcher.state import is_alive, read_state
from llmesh.pb.common.v1 import options_pb2
from llmesh.pb.inference.v1 import inference_pb2, inference_pb2_grpc
from llmesh.pb.security.v1 import security_pb2, security_pb2_grpc
from llmesh.config import MeshConfig
from llmesh.runtime.config import ServerSettings
from llmesh.runtime.files import address
from llmesh.services.security.settings import SecuritySettings
from llmesh.runtime.identity import HS256_SECRET, INTERNAL_SECRET
from llmesh.runtime.sqlite import connect as connect_db  # the services' own read-only connection
from llmesh.services.gateway.fields import has_pii, mask_message
from llmesh.services.gateway.masking import DEFAULT_OPERATORS, Masker, Vault
from llmesh.services.gateway.routes import PUBLIC_SERVICES, service_descriptor
from llmesh.services.inference.servicer import InferenceServicer
from llmesh.services.security import apikeys, tokens
from llmesh.services.security.keyring import DecryptError, StoredCiphertexts, parse_header, version_name
from llmesh.services.security.servicer import SecurityServicer

Status = Literal["pass", "warn", "fail"]
Finding = tuple[Status, str]

# Reaching a service, or finding it down, must not stall the report.
PROBE_TIMEOUT_S = 2.0
# Walking a long audit chain legitimately takes longer than reaching the service.
VERIFY_TIMEOUT_S = 60.0
_RANK: dict[Status, int] = {"pass": 0, "warn": 1, "fail": 2}
_NO_PROXY = [("grpc.enable_http_proxy", 0)]  # an http_proxy must not reroute loopback probes
INFERENCE = "llmesh.inference.v1.Inference"
SECURITY = "llmesh.security.v1.Security"
# Read-only, side-effect-free RPCs used to knock on a service's door without an identity.
PROBE_METHODS = {INFERENCE: f"/{INFERENCE}/ListTemplates", SECURITY: f"/{SECURITY}/GetMaskingRules"}
# A synthetic CN mobile number for the masking self-test (not a real subscriber).
SAMPLE_PHONE = "13812348000"


@dataclass(frozen=True)
class Check:
    id: str
    title: str
    status: Status
    evidence: list[str]

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def worst(statuses: Iterable[Status]) -> Status:
    return max(statuses, key=_RANK.__getitem__, default="pass")


def make_check(check_id: str, title: str, findings: list[Finding]) -> Check:
    """The check's status is its worst finding; non-passing lines are tagged so a reader
    sees which evidence caused it."""
    lines = [text if s == "pass" else f"{s.upper()}: {text}" for s, text in findings]
    return Check(check_id, title, worst(s for s, _ in findings), lines)


# ---------------------------------------------------------------- addresses
def is_loopback(host: str) -> bool:
    """Literal loopback addresses and ``localhost`` only: any other name could resolve
    anywhere, so it is not assumed local (and nothing is resolved)."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return False
    # gRPC reports some sockets as IPv4-mapped IPv6 ("::ffff:127.0.0.1").
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return (mapped or ip).is_loopback


def host_of(address: str) -> str:
    """The host of ``host:port``, ``[v6]:port`` or a URL such as ``redis://host:port/0``;
    ``localhost`` for Unix sockets, which never leave the machine."""
    if address.startswith(("unix:", "unix-abstract:")):
        return "localhost"
    if "://" in address:
        return urlsplit(address).hostname or ""
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    return address.rpartition(":")[0] if ":" in address else address


def display_url(url: str) -> str:
    """A URL without its user/password part, safe to print."""
    parts = urlsplit(url)
    if not parts.password and not parts.username:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def server_address(s: ServerSettings) -> str:
    return address(s.host, s.port)


def bind_hosts(cfg: MeshConfig) -> dict[str, str]:
    """Every listen host the config sets (tritonserver has no setting: see live sockets)."""
    return {
        "inference.server.host": cfg.inference.server.host,
        "security.server.host": cfg.security.server.host,
        "gateway.server.host": cfg.gateway.server.host,
        "redis.host": cfg.redis.host,
    }


def peer_addresses(cfg: MeshConfig) -> dict[str, str]:
    """Every address a service dials: plaintext gRPC/RESP, so each must stay on the host."""
    peers = {
        "inference.peers.triton": cfg.inference.peers.triton,
        "inference.peers.redis": cfg.inference.peers.redis,
        "gateway.peers.security": cfg.gateway.peers.security,
        "gateway.peers.redis": cfg.gateway.peers.redis,
    }
    return peers | {f"gateway.upstreams[{name}]": addr for name, addr in cfg.gateway.upstreams.items()}


def tls_settings() -> list[str]:
    """Server settings that would configure TLS; none exist yet."""
    return [name for name in ServerSettings.model_fields if "tls" in name or "cert" in name]


# ---------------------------------------------------------------- files and database
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def private_file(path: Path, what: str) -> Finding:
    """A secret file must exist and be readable by its owner only."""
    if not path.is_file():
        return "fail", f"{what} {path} is missing"
    mode = _mode(path)
    if mode & 0o077:
        return "fail", f"{what} {path} has mode {mode:04o}: readable by group/others (want 0600)"
    return "pass", f"{what} {path}: mode {mode:04o}, {path.stat().st_size} bytes"


def security_dir(cfg: MeshConfig) -> Path:
    return cfg.home / "security"


def _open_db(cfg: MeshConfig) -> sqlite3.Connection | None:
    """The security database opened read-only, with the service's own connection helper."""
    path = security_dir(cfg) / "security.db"
    return connect_db(path, readonly=True) if path.is_file() else None


def _stored_ciphertexts() -> list[StoredCiphertexts]:
    """The columns the keyring re-wraps on rotation: by construction, every secret column."""
    return [apikeys.STORED, tokens.STORED]


def _columns(conn: sqlite3.Connection) -> Iterator[tuple[str, str]]:
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    for table in tables:
        for col in conn.execute(f"PRAGMA table_info({table})"):
            yield table, col["name"]


def plaintext_secret_columns(conn: sqlite3.Connection) -> list[str]:
    """Columns whose name says secret/private/password/token but that the keyring does not
    encrypt: where a plaintext secret would be."""
    encrypted = {(s.table, s.ct_column) for s in _stored_ciphertexts()}
    words = ("secret", "private", "password", "passwd", "token")
    return [f"{t}.{c}" for t, c in _columns(conn) if any(w in c.lower() for w in words) and (t, c) not in encrypted]


def ciphertext_findings(conn: sqlite3.Connection) -> list[Finding]:
    """Every value of every keyring column must parse as ``L || kN || nonce || ct || tag``
    naming a data key the database holds; anything else is a plaintext (or foreign) value."""
    versions = {version_name(r[0]) for r in conn.execute("SELECT version FROM data_keys")}
    out: list[Finding] = []
    for s in _stored_ciphertexts():
        rows = conn.execute(f"SELECT {s.key_column} AS k, {s.ct_column} AS ct FROM {s.table}").fetchall()
        bad, used = [], set()
        for r in rows:
            try:
                if not isinstance(r["ct"], bytes):
                    raise DecryptError("stored as text, not a blob")
                name, _, _ = parse_header(r["ct"])
                if name not in versions:
                    raise DecryptError(f"names unknown data key {name}")
                used.add(name)
            except DecryptError as e:
                bad.append(f"{r['k']} ({e})")
        column = f"{s.table}.{s.ct_column}"
        if bad:
            out.append(
                (
                    "fail",
                    f"{column}: {len(bad)} of {len(rows)} value(s) are not AES-256-GCM keyring "
                    f"ciphertexts: {', '.join(bad[:3])}",
                )
            )
        else:
            keys = ", ".join(sorted(used)) or "none used yet"
            out.append(
                ("pass", f"{column}: {len(rows)} value(s), all AES-256-GCM keyring ciphertexts (data keys: {keys})")
            )
    return out


def db_exposure_findings(folder: Path) -> list[Finding]:
    """The database holds key metadata and the audit log in clear: only file permissions
    keep other local users out of it (a 0644 file in a 0700 folder is still private)."""
    if not folder.is_dir() or not _mode(folder) & 0o077:
        return []
    db = folder / "security.db"
    readable = db.is_file() and _mode(db) & 0o077
    what = (
        f"and {db.name} has mode {_mode(db):04o}: key metadata and audit records are readable by other users"
        if readable
        else "other users can enter it"
    )
    # The service asks for 0700, but whichever process creates the folder first wins.
    return [("warn", f"{folder} has mode {_mode(folder):04o} {what}")]


def security_store_findings(cfg: MeshConfig) -> list[Finding]:
    """The security service's state on disk: master key, data keys, secret columns."""
    folder = security_dir(cfg)
    out = [private_file(folder / "master.key", "keyring master key"), *db_exposure_findings(folder)]
    try:
        conn = _open_db(cfg)
    except sqlite3.Error as e:
        return [*out, ("fail", f"{folder / 'security.db'}: cannot open read-only: {e}")]
    if conn is None:
        return [*out, ("fail", f"{folder / 'security.db'} is missing (the security service never started here)")]
    try:
        n_keys = conn.execute("SELECT COUNT(*) FROM data_keys").fetchone()[0]
        out.append(("pass", f"security.db (opened read-only): {n_keys} data key(s) wrapped by the master key"))
        plain = plaintext_secret_columns(conn)
        if plain:
            out.append(("fail", f"columns that look like secrets but are not keyring-encrypted: {', '.join(plain)}"))
        else:
            out.append(("pass", "no plaintext secret columns (schema of every table checked)"))
        out += ciphertext_findings(conn)
    except sqlite3.Error as e:
        out.append(("fail", f"security.db: {e}"))
    finally:
        conn.close()
    out.append(("pass", "security.db itself is not encrypted: key metadata and audit records rely on file permissions"))
    return out


# ---------------------------------------------------------------- Redis
def redis_config(url: str, *params: str) -> dict[str, str]:
    """``CONFIG GET`` of each parameter on the live Redis (raises ``redis.RedisError``)."""
    client = redis.Redis.from_url(
        url, socket_timeout=PROBE_TIMEOUT_S, socket_connect_timeout=PROBE_TIMEOUT_S, decode_responses=True
    )
    try:
        out: dict[str, str] = {}
        for p in params:
            out.update(client.config_get(p))
        return out
    finally:
        client.close()


def redis_persistence_finding(url: str) -> Finding:
    """Chat memory reaches disk only through RDB snapshots or the AOF."""
    where = f"Redis at {display_url(url)} (chat memory)"
    try:
        conf = redis_config(url, "save", "appendonly")
    except redis.RedisError as e:
        return "fail", f"{where} unreachable or CONFIG refused: {e}"
    save, aof = conf.get("save", ""), conf.get("appendonly", "no")
    seen = f"CONFIG GET save={save!r}, appendonly={aof!r}"
    if not save.strip() and aof == "no":
        return "pass", f"{where}: persistence off ({seen}): conversations never reach disk"
    return "warn", f"{where}: persistence on ({seen}): conversations are written to disk unencrypted"


def redis_auth_finding(url: str) -> Finding:
    where = f"Redis at {display_url(url)}"
    try:
        conf = redis_config(url, "requirepass")
    except redis.RedisError as e:
        return "fail", f"{where} unreachable or CONFIG refused: {e}"
    if conf.get("requirepass"):
        return "pass", f"{where}: password required (CONFIG GET requirepass is set)"
    return "warn", (
        f"{where}: no password (CONFIG GET requirepass is empty): any local user can read or "
        "change chat memory, bypassing the internal identity"
    )


# ---------------------------------------------------------------- live processes
def listening_sockets(cfg: MeshConfig) -> list[tuple[str, str, int]] | None:
    """(process, ip, port) of every LISTEN socket of the mesh's live processes and their
    children, from the launcher's state file; None when no mesh process is alive."""
    out: list[tuple[str, str, int]] = []
    alive = False
    for rec in (read_state(cfg) or {}).get("processes", []):
        pid = rec.get("pid")
        if not pid or not is_alive(pid, rec.get("create_time")):
            continue
        alive = True
        try:
            proc = psutil.Process(pid)
            for p in (proc, *proc.children(recursive=True)):
                out += [
                    (str(rec["name"]), c.laddr.ip, c.laddr.port)
                    for c in p.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN
                ]
        except psutil.Error:
            continue  # exited meanwhile
    return out if alive else None


def call_without_identity(address: str, method: str) -> grpc.StatusCode:
    """One unary call carrying no metadata at all (an empty request is valid for any
    message type); OK if the service answered it."""
    with grpc.insecure_channel(address, options=_NO_PROXY) as channel:
        try:
            channel.unary_unary(method)(b"", timeout=PROBE_TIMEOUT_S)
        except grpc.RpcError as e:
            return e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.OK


def unauthenticated_probe(label: str, address: str, method: str) -> Finding:
    code = call_without_identity(address, method)
    seen = f"{label} {address} {method} without identity → {code.name}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return "pass", seen
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return "fail", f"{label} unreachable at {address} ({code.name}): cannot show it refuses anonymous calls"
    return "fail", f"{seen}, expected UNAUTHENTICATED"


# ---------------------------------------------------------------- descriptors
def public_services() -> list[ServiceDescriptor]:
    return [service_descriptor(name) for name in PUBLIC_SERVICES]


def method_policy(m: MethodDescriptor) -> options_pb2.MethodPolicy:
    return m.GetOptions().Extensions[options_pb2.method_policy]


@dataclass(frozen=True)
class PolicyCounts:
    total: int
    scoped: int
    implemented: int
    anonymous: list[str]
    unguarded: list[str]  # neither a scope, a role, nor marked anonymous


def count_policies(services: Iterable[ServiceDescriptor]) -> PolicyCounts:
    total = scoped = implemented = 0
    anonymous, unguarded = [], []
    for svc in services:
        for m in svc.methods:
            p, path = method_policy(m), f"{svc.name}/{m.name}"
            total += 1
            implemented += p.implemented
            if p.anonymous:
                anonymous.append(path)
            elif p.scope or p.roles:
                scoped += 1
            else:
                unguarded.append(path)
    return PolicyCounts(total, scoped, implemented, anonymous, unguarded)


def _messages(services: Iterable[ServiceDescriptor]) -> list[Descriptor]:
    """Every message type reachable from the services' requests and responses."""
    seen: dict[str, Descriptor] = {}
    stack = [t for s in services for m in s.methods for t in (m.input_type, m.output_type)]
    while stack:
        d = stack.pop()
        if d.full_name not in seen:
            seen[d.full_name] = d
            stack += [f.message_type for f in d.fields if f.message_type is not None]
    return [seen[k] for k in sorted(seen)]


def sensitive_fields(services: Iterable[ServiceDescriptor]) -> dict[str, list[str]]:
    """Field full names by sensitivity ("pii", "secret") from their ``field_policy``."""
    names = {options_pb2.SENSITIVITY_PII: "pii", options_pb2.SENSITIVITY_SECRET: "secret"}
    out: dict[str, list[str]] = {"pii": [], "secret": []}
    for d in _messages(services):
        for f in d.fields:
            kind = names.get(f.GetOptions().Extensions[options_pb2.field_policy].sensitivity)
            if kind:
                out[kind].append(f.full_name)
    return out


def _overrides(servicer: type, base: type, name: str) -> bool:
    """The servicer implements ``name`` itself (the generated base answers UNIMPLEMENTED)."""
    return getattr(servicer, name, None) is not getattr(base, name, None)


def implementation_finding(svc: ServiceDescriptor, method: str, servicer: type, base: type, purpose: str) -> Finding:
    m = svc.methods_by_name.get(method)
    if m is None:
        return "fail", f"{svc.full_name}/{method} does not exist: {purpose} is impossible"
    p = method_policy(m)
    in_code = _overrides(servicer, base, method)
    seen = (
        f"{svc.name}/{method}: method_policy implemented={str(p.implemented).lower()}, scope {p.scope!r}, "
        f"{servicer.__name__} {'overrides' if in_code else 'does not override'} it"
    )
    return ("pass" if p.implemented and in_code else "fail"), f"{seen} ({purpose})"


# ---------------------------------------------------------------- the checks
def encryption_at_rest(cfg: MeshConfig) -> Check:
    findings = [*security_store_findings(cfg), redis_persistence_finding(cfg.inference.peers.redis)]
    return make_check("encryption_at_rest", "Encryption at rest", findings)


def transit_config_findings(cfg: MeshConfig) -> list[Finding]:
    out: list[Finding] = []
    for key, host in bind_hosts(cfg).items():
        if is_loopback(host):
            out.append(("pass", f"{key}={host} (loopback)"))
        else:
            out.append(("fail", f"{key}={host} is not loopback and TLS is not implemented: traffic in clear"))
    peers = peer_addresses(cfg)
    remote = {k: a for k, a in peers.items() if not is_loopback(host_of(a))}
    out += [
        ("fail", f"{k}={display_url(a)} leaves the host in clear (TLS is not implemented)") for k, a in remote.items()
    ]
    if not remote:
        out.append(("pass", f"all {len(peers)} peer/upstream addresses are loopback"))
    tls = tls_settings()
    out.append(
        (
            "pass",
            f"TLS settings: {', '.join(tls)}"
            if tls
            else "loopback only; TLS not configured (ServerSettings has no TLS fields)",
        )
    )
    return out


def live_socket_findings(cfg: MeshConfig) -> list[Finding]:
    sockets = listening_sockets(cfg)
    if sockets is None:
        return [("warn", f"live listening sockets not checked: no live mesh process in {cfg.run_dir / 'state.json'}")]
    exposed = [f"{name} {address(ip, port)}" for name, ip, port in sockets if not is_loopback(ip)]
    if exposed:
        return [("fail", f"listening beyond loopback: {', '.join(exposed)}")]
    by_proc: dict[str, list[str]] = {}
    for name, ip, port in sorted(sockets):
        by_proc.setdefault(name, []).append(address(ip, port))
    listing = "; ".join(f"{k} {' '.join(v)}" for k, v in by_proc.items())
    return [("pass", f"live LISTEN sockets of mesh processes, all loopback: {listing}")]


def encryption_in_transit(cfg: MeshConfig) -> Check:
    return make_check(
        "encryption_in_transit", "Encryption in transit", [*transit_config_findings(cfg), *live_socket_findings(cfg)]
    )


def policy_findings(services: list[ServiceDescriptor]) -> list[Finding]:
    c = count_policies(services)
    out: list[Finding] = [
        (
            "pass",
            f"method_policy in {len(services)} services: {c.total} methods, {c.scoped} need a "
            f"scope/role, {len(c.anonymous)} anonymous ({', '.join(c.anonymous) or 'none'}), "
            f"{c.implemented} implemented",
        )
    ]
    if c.unguarded:
        out.append(
            (
                "warn",
                f"{len(c.unguarded)} method(s) with no scope, role or anonymous flag: {', '.join(c.unguarded[:5])}",
            )
        )
    return out


def token_signing_findings(cfg: MeshConfig) -> list[Finding]:
    alg, accepted = cfg.security.signing_algorithm, cfg.gateway.jwt_algorithms
    seen = f"security.signing_algorithm={alg}, gateway.jwt_algorithms={','.join(accepted)}"
    if alg != "HS256" and "HS256" not in accepted:
        return [("pass", f"{seen}: tokens are checked against the security service's published keys (JWKS)")]
    return [
        ("warn", f"{seen}: HS256 development mode, tokens signed with a secret the gateway shares"),
        private_file(security_dir(cfg) / HS256_SECRET, "HS256 token secret"),
    ]


def access_control(cfg: MeshConfig) -> Check:
    gw = cfg.gateway
    findings: list[Finding] = [
        ("pass", "gateway.require_signature=true: every authenticated call carries an HMAC signature")
        if gw.require_signature
        else (
            "warn",
            "gateway.require_signature=false: a stolen JWT is enough (no request signature, no replay check)",
        ),
        *token_signing_findings(cfg),
        private_file(security_dir(cfg) / INTERNAL_SECRET, "internal identity key"),
        unauthenticated_probe("inference service", server_address(cfg.inference.server), PROBE_METHODS[INFERENCE]),
        unauthenticated_probe("security service", server_address(cfg.security.server), PROBE_METHODS[SECURITY]),
    ]
    if INFERENCE in gw.upstreams:  # the public port: no JWT must mean no access
        findings.append(unauthenticated_probe("gateway", server_address(gw.server), PROBE_METHODS[INFERENCE]))
    findings += policy_findings(public_services())
    findings.append(redis_auth_finding(cfg.inference.peers.redis))
    return make_check("access_control", "Access control", findings)


def audit_chain_finding(cfg: MeshConfig) -> Finding:
    s = cfg.security.server
    address = server_address(s)
    health = probe_grpc(s.host, s.port, timeout=PROBE_TIMEOUT_S)
    if health == DOWN:
        return "fail", f"security service unreachable at {address}: audit chain not verified"
    if not (security_dir(cfg) / INTERNAL_SECRET).is_file():  # local_channel would create one
        return "fail", f"{security_dir(cfg) / INTERNAL_SECRET} is missing: cannot call the security service"
    channel = local_channel(address, cfg.home)
    try:
        stub = security_pb2_grpc.SecurityStub(channel)
        r = stub.VerifyAuditChain(security_pb2.VerifyAuditChainRequest(), timeout=VERIFY_TIMEOUT_S)
    except grpc.RpcError as e:
        return "fail", f"VerifyAuditChain at {address} failed: {describe_error(e)}"
    finally:
        channel.close()
    if r.intact:
        return "pass", f"VerifyAuditChain at {address}: ok, hash chain intact over {r.records} records"
    return "fail", f"VerifyAuditChain at {address}: BROKEN at record {r.first_bad_sequence} of {r.records}: {r.detail}"


def audit_spool(cfg: MeshConfig) -> Path:
    return cfg.home / "gateway" / "audit-spool"  # as gateway/__main__.py passes to AuditSink


def audit_spool_finding(cfg: MeshConfig) -> Finding:
    """Batches a gateway could not deliver at shutdown wait on disk outside the chain."""
    folder = audit_spool(cfg)
    files = sorted(folder.glob("*.pb")) if folder.is_dir() else []
    if not files:
        return "pass", f"no audit batches waiting in the gateway spool ({folder})"
    return "warn", (
        f"{len(files)} audit batch file(s) in {folder} are not yet in the hash chain: they can be "
        "altered or deleted undetected until a gateway starts and delivers them"
    )


def audit_log(cfg: MeshConfig) -> Check:
    return make_check("audit_log", "Tamper-evident audit log", [audit_chain_finding(cfg), audit_spool_finding(cfg)])


def masking_self_test(cfg: MeshConfig) -> Finding:
    """Mask a request exactly as the gateway does (same Masker construction, same
    field-policy walk) and check the phone number is gone."""
    try:
        masker = Masker(operators=cfg.gateway.masking or None)  # type: ignore[arg-type]  # as gateway/__main__.py
    except ValueError as e:
        return "fail", f"gateway.masking is invalid (the gateway would not start): {e}"
    sample = f"请回拨 {SAMPLE_PHONE} 谢谢"
    msg = inference_pb2.GenerateRequest(prompt=sample)
    counts = mask_message(msg, masker, Vault())
    seen = f"self-test: GenerateRequest.prompt {sample!r} → {msg.prompt!r} (entities {counts})"
    return ("fail", f"{seen}: the number survived") if SAMPLE_PHONE in msg.prompt else ("pass", seen)


def pii_masking(cfg: MeshConfig) -> Check:
    fields = sensitive_fields(public_services())
    routed = [service_descriptor(name) for name in cfg.gateway.upstreams]
    routed_pii = sensitive_fields(routed)["pii"]
    masked_methods = [f"{s.name}/{m.name}" for s in routed for m in s.methods if has_pii(m.input_type)]
    pii = fields["pii"]
    if cfg.gateway.masking:
        ops = (
            ", ".join(f"{k}={v}" for k, v in sorted(cfg.gateway.masking.items())) + " (gateway.masking; others default)"
        )
    else:
        ops = ", ".join(f"{k}={v.value}" for k, v in DEFAULT_OPERATORS.items()) + " (defaults from masking.py)"
    findings: list[Finding] = [
        (
            "pass" if pii else "warn",
            f"{len(pii)} field(s) marked field_policy PII in the contracts, {len(routed_pii)} "
            f"in routed services, e.g. {', '.join((routed_pii or pii)[:4])}",
        ),
        ("pass", f"{len(fields['secret'])} field(s) marked SECRET (never logged or audited in clear)"),
        (
            "pass",
            f"{len(masked_methods)} routed method(s) have PII in their request, masked at the gateway "
            f"before forwarding: {', '.join(masked_methods[:6])}{' …' if len(masked_methods) > 6 else ''}",
        ),
        ("pass", f"operators: {ops}"),
        masking_self_test(cfg),
    ]
    return make_check("pii_masking", "PII masking", findings)


def retention_settings() -> list[str]:
    """Security settings that would bound how long audit records are kept; none exist yet."""
    return [name for name in SecuritySettings.model_fields if "retention" in name or "expir" in name]


def audit_span_finding(cfg: MeshConfig) -> Finding:
    try:
        conn = _open_db(cfg)
        if conn is None:
            return "warn", "audit records not counted: security.db is missing"
        try:
            n, oldest = conn.execute("SELECT COUNT(*), MIN(time_us) FROM audit").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as e:
        return "warn", f"audit records not counted: {e}"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(oldest / 1e6)) if oldest else "-"
    return "pass", f"audit table: {n} record(s), oldest {since}"


def retention(cfg: MeshConfig) -> Check:
    ttl = cfg.inference.chat_ttl_seconds
    settings = retention_settings()
    findings: list[Finding] = [
        ("pass", f"inference.chat_ttl_seconds={ttl}: a conversation expires {ttl} s after its last turn (Redis TTL)")
        if ttl > 0
        else ("warn", f"inference.chat_ttl_seconds={ttl}: Redis deletes the history at once (chat memory unusable)"),
        ("pass", f"security.token_ttl_seconds={cfg.security.token_ttl_seconds}: access tokens live at most that long"),
        ("pass", f"audit retention configured: {', '.join(settings)}")
        if settings
        else ("warn", "audit log kept indefinitely: no retention/expiry setting in the security section"),
        audit_span_finding(cfg),
    ]
    return make_check("retention", "Data retention", findings)


def right_to_be_forgotten(cfg: MeshConfig) -> Check:
    inference, security = service_descriptor(INFERENCE), service_descriptor(SECURITY)
    ttl = cfg.inference.chat_ttl_seconds
    erasers = [m.name for m in security.methods if m.name.startswith(("Delete", "Purge", "Erase"))]
    findings: list[Finding] = [
        implementation_finding(
            inference,
            "DeleteConversation",
            InferenceServicer,
            inference_pb2_grpc.InferenceServicer,
            "erase a conversation on request",
        ),
        implementation_finding(
            security,
            "RevokeApiKey",
            SecurityServicer,
            security_pb2_grpc.SecurityServicer,
            "revoke a subject's API keys",
        ),
        ("pass", f"conversation keys carry a TTL (inference.chat_ttl_seconds={ttl}): forgotten without a request")
        if ttl > 0
        else ("warn", f"inference.chat_ttl_seconds={ttl}: conversation keys carry no usable TTL"),
    ]
    if not erasers:
        findings.append(
            (
                "warn",
                f"{security.name} has no Delete/Purge RPC: revoked API keys keep owner/tenant in "
                "security.db, and audit records keep actor ids (append-only hash chain)",
            )
        )
    return make_check("right_to_be_forgotten", "Right to be forgotten", findings)


CHECKS: tuple[Callable[[MeshConfig], Check], ...] = (
    encryption_at_rest,
    encryption_in_transit,
    access_control,
    audit_log,
    pii_masking,
    retention,
    right_to_be_forgotten,
)


def run_checks(cfg: MeshConfig) -> list[Check]:
    """Every check in order; a check that breaks unexpectedly fails with the error as its
    evidence, so one bug never hides the other results."""
    out = []
    for fn in CHECKS:
        try:
            out.append(fn(cfg))
        except Exception as e:
            out.append(
                Check(fn.__name__, fn.__name__.replace("_", " "), "fail", [f"check error: {type(e).__name__}: {e}"])
            )
    return out
