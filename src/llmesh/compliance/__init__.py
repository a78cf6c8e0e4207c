"""``llmesh compliance report``: GDPR/HIPAA-style checks derived from the mesh's actual
configuration, its files under ``LLMESH_HOME`` and live probes of the running processes.

Nothing here is a hard-coded answer: every line of evidence says what was read or asked
(a config key, a file mode, a database column, a Redis ``CONFIG GET``, an RPC and its
status code), so a reviewer can repeat it by hand. A probe that cannot run (the mesh is
down) fails its check and says so; the report itself never crashes. Read-only
throughout: no file is created (not even ``internal.key``) and nothing is written.

One module per check (`at_rest`, `in_transit`, `access_control`, `audit_log`,
`pii_masking`, `retention`, `right_to_be_forgotten`), run in order by `report`. A
service's state is read through RPCs or the reader the owning service exports
(``llmesh.services.security.state_reader``, the gateway's ``audit.spooled_records``),
never by opening another service's tables here.
"""

from __future__ import annotations

from llmesh.compliance.findings import Check, Finding, Status
from llmesh.compliance.report import CHECKS, run_checks

__all__ = ["CHECKS", "Check", "Finding", "Status", "run_checks"]
