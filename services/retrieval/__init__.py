"""The retrieval service (filled by a later issue)."""
