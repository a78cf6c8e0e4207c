"""Method policy (the ``method_policy`` proto option) and the scope/role rules, shared
by the gateway (which checks the caller's token) and every service (which checks the
internal identity again: defence in depth, so a bug or a misrouted call in the gateway
cannot widen anyone's access)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Protocol

from google.protobuf import descriptor_pool

from llmesh.pb.common.v1 import options_pb2
from llmesh.runtime.errors import PermissionDenied


class HasGrants(Protocol):
    @property
    def scopes(self) -> frozenset[str]: ...

    @property
    def roles(self) -> frozenset[str]: ...


def scope_matches(granted: str, required: str) -> bool:
    """Exact, ``*``, or a trailing wildcard segment: ``inference:*`` grants ``inference:generate``."""
    if granted == required or granted == "*":
        return True
    return granted.endswith(":*") and required.startswith(granted[:-1])


def has_scope(scopes: Iterable[str], required: str) -> bool:
    return any(scope_matches(g, required) for g in scopes)


def authorize(principal: HasGrants, required_scope: str, roles: Sequence[str] = ()) -> None:
    """Raise ``PermissionDenied`` unless the principal holds ``required_scope`` (an empty
    string requires none) AND, when ``roles`` is non-empty, at least one of ``roles``."""
    if required_scope and not has_scope(principal.scopes, required_scope):
        raise PermissionDenied(f"missing scope '{required_scope}'", metadata={"required_scope": required_scope})
    if roles and not principal.roles.intersection(roles):
        wanted = ", ".join(sorted(roles))
        raise PermissionDenied(f"requires one of roles: {wanted}", metadata={"required_roles": wanted})


@lru_cache(maxsize=1024)
def policy_for(path: str) -> options_pb2.MethodPolicy | None:
    """The policy of ``/pkg.Service/Method`` from the generated descriptors (the module
    defining the service must have been imported); None for unknown methods."""
    try:
        service, method = path.lstrip("/").split("/", 1)
        m = descriptor_pool.Default().FindMethodByName(f"{service}.{method}")
    except (KeyError, ValueError):
        return None
    options = m.GetOptions()
    return options.Extensions[options_pb2.method_policy] if options.HasExtension(options_pb2.method_policy) else None


def check(principal: HasGrants, path: str) -> None:
    """Enforce ``path``'s policy for ``principal`` (methods without one need nothing)."""
    policy = policy_for(path)
    if policy is not None and not policy.anonymous:
        authorize(principal, policy.scope, list(policy.roles))
