"""Security definitions shared by clients and services: the HMAC request-signature
scheme (``signature``: the client SDK signs, the gateway verifies) and the one PII rule
set (``pii``: the gateway enforces it, the security service publishes it). Depends on
``llmesh.runtime`` only, never on a service (tests/unit/test_layers.py)."""
