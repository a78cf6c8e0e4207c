"""What the proto contracts declare: method policies and field sensitivity, read from the
real descriptors, and whether a servicer implements a method it must have."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor

from llmesh.compliance.findings import Finding
from llmesh.pb.common.v1 import options_pb2
from llmesh.services.gateway.routes import PUBLIC_SERVICES, service_descriptor

INFERENCE = "llmesh.inference.v1.Inference"
SECURITY = "llmesh.security.v1.Security"


def public_services() -> list[ServiceDescriptor]:
    return [service_descriptor(name) for name in PUBLIC_SERVICES]


def method_policy(m: MethodDescriptor) -> options_pb2.MethodPolicy:
    policy: options_pb2.MethodPolicy = m.GetOptions().Extensions[options_pb2.method_policy]
    return policy


@dataclass(frozen=True)
class PolicyCounts:
    total: int
    scoped: int
    implemented: int
    anonymous: list[str]
    unguarded: list[str]  # neither a scope, a role, nor marked anonymous


def count_policies(services: Iterable[ServiceDescriptor]) -> PolicyCounts:
    total = scoped = implemented = 0
    anonymous: list[str] = []
    unguarded: list[str] = []
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
