"""The report: every check in order, each isolated so one broken check never hides the
others' results."""

from __future__ import annotations

from collections.abc import Callable

from llmesh.compliance.access_control import access_control
from llmesh.compliance.at_rest import encryption_at_rest
from llmesh.compliance.audit_log import audit_log
from llmesh.compliance.findings import Check
from llmesh.compliance.in_transit import encryption_in_transit
from llmesh.compliance.pii_masking import pii_masking
from llmesh.compliance.retention import retention
from llmesh.compliance.right_to_be_forgotten import right_to_be_forgotten
from llmesh.config import MeshConfig

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
