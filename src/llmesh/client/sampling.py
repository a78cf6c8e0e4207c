"""Sampling parameters with only the fields the caller set (the rest keep the server's defaults)."""

from __future__ import annotations

from llmesh.pb.common.v1 import types_pb2


def sampling(
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
) -> types_pb2.SamplingParams:
    s = types_pb2.SamplingParams(stop=stop or [])
    for name, value in (
        ("max_tokens", max_tokens),
        ("temperature", temperature),
        ("top_p", top_p),
        ("top_k", top_k),
        ("seed", seed),
    ):
        if value is not None:
            setattr(s, name, value)
    return s
