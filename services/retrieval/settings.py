"""The retrieval service's section of the mesh configuration (``retrieval:``)."""

from __future__ import annotations

from llmesh.runtime.config import Section, ServerSettings


class RetrievalSettings(Section):
    server: ServerSettings = ServerSettings(port=50065, metrics_port=9465)
