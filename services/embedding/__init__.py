"""The embedding service (filled by a later issue)."""
