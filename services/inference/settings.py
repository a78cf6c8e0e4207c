"""The inference service's section of the mesh configuration (``inference:``)."""

from __future__ import annotations

from llmesh.runtime.config import Section, ServerSettings


class InferencePeers(Section):
    triton: str
    redis: str


class InferenceSettings(Section):
    server: ServerSettings
    peers: InferencePeers
    model: str = "llm"
    max_prompt_chars: int = 16_000
    default_max_tokens: int = 128
    max_tokens_limit: int = 1024
    # Seconds a call may take when the client sets no deadline.
    default_timeout_s: float = 120.0
    chat_max_messages: int = 32
    chat_ttl_seconds: int = 3600
    # YAML template library; empty: the bundled one.
    templates_path: str = ""
