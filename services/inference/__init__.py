"""The inference service: generation and token streaming through Triton, prompt
templates, chat with server-side memory, per-request LoRA adapters."""
