"""The embedding service's section of the mesh configuration (``embedding:``)."""

from __future__ import annotations

from llmesh.runtime.config import Section, ServerSettings


class EmbeddingSettings(Section):
    server: ServerSettings = ServerSettings(port=50064, metrics_port=9464)
