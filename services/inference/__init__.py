"""The inference service (50061): generation and token streaming, prompt templates,
chat with server-side memory, per-request LoRA adapters. Its state is chat history in
Redis (db 0, expiring); it reads the published adapters' announcement
(``LLMESH_HOME/adapters/registry.json``, written by the trainer). It calls Triton (the
``llm`` model, over gRPC) and Redis."""
