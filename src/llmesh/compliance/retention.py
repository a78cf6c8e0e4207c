"""Data retention: the chat-memory TTL, the token lifetime, whether the audit log has a
retention setting, and its span (through the security service's state reader)."""

from __future__ import annotations

import sqlite3
import time

from llmesh.compliance.findings import Check, Finding, make_check
from llmesh.compliance.probes import security_dir
from llmesh.config import MeshConfig
from llmesh.services.security.settings import SecuritySettings
from llmesh.services.security.state_reader import DATABASE, SecurityState


def retention_settings() -> list[str]:
    """Security settings that would bound how long audit records are kept; none exist yet."""
    return [name for name in SecuritySettings.model_fields if "retention" in name or "expir" in name]


def audit_span_finding(cfg: MeshConfig) -> Finding:
    try:
        state = SecurityState.open(security_dir(cfg))
        if state is None:
            return "warn", f"audit records not counted: {DATABASE} is missing"
        with state:
            span = state.audit_span()
    except sqlite3.Error as e:
        return "warn", f"audit records not counted: {e}"
    oldest = span.oldest_time_us
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(oldest / 1e6)) if oldest else "-"
    return "pass", f"audit table: {span.records} record(s), oldest {since}"


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
