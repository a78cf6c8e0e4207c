"""The runtime every llmesh service shares: config, server bootstrap, interceptors,
channels to peers, telemetry. Services import from here; nothing is copied."""
