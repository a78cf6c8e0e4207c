"""llmesh: a mesh of gRPC services for serving, adapting and safely exposing large models."""

__version__ = "0.1.0"
