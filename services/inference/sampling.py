"""Sampling parameters: validated once, at the edge, with the field named."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmesh.pb.common.v1 import types_pb2
from llmesh.runtime.errors import InvalidArgument

MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 64


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 128
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    repetition_penalty: float = 1.0

    @classmethod
    def from_pb(
        cls,
        pb: types_pb2.SamplingParams,
        *,
        default_max_tokens: int,
        max_tokens_limit: int,
        defaults: types_pb2.SamplingParams | None = None,
        prefix: str = "sampling",
    ) -> Sampling:
        """Request values win over ``defaults`` (a template's suggestions), which win over ours."""
        merged = types_pb2.SamplingParams()
        if defaults is not None:
            merged.MergeFrom(defaults)
        merged.MergeFrom(pb)
        if pb.stop:
            del merged.stop[:]
            merged.stop.extend(pb.stop)

        def check(name: str, ok: bool, why: str) -> None:
            if not ok:
                raise InvalidArgument(f"{prefix}.{name}", why)

        t = merged.temperature if merged.HasField("temperature") else 1.0
        check("temperature", 0.0 <= t <= 2.0, f"must be in [0, 2], got {t:g}")
        p = merged.top_p if merged.HasField("top_p") else 1.0
        check("top_p", 0.0 < p <= 1.0, f"must be in (0, 1], got {p:g}")
        k = merged.top_k if merged.HasField("top_k") else 0
        check("top_k", k <= 1000, f"must be in [0, 1000], got {k}")
        n = merged.max_tokens if merged.HasField("max_tokens") else default_max_tokens
        check("max_tokens", 1 <= n <= max_tokens_limit, f"must be in [1, {max_tokens_limit}], got {n}")
        r = merged.repetition_penalty if merged.HasField("repetition_penalty") else 1.0
        check("repetition_penalty", 1.0 <= r <= 2.0, f"must be in [1, 2], got {r:g}")
        check("stop", len(merged.stop) <= MAX_STOP_SEQUENCES, f"at most {MAX_STOP_SEQUENCES} sequences")
        for i, s in enumerate(merged.stop):
            check(f"stop[{i}]", 0 < len(s) <= MAX_STOP_CHARS, f"must be 1..{MAX_STOP_CHARS} characters")
        seed = merged.seed if merged.HasField("seed") else None
        check("seed", seed is None or seed < 2**63, "must be below 2^63")
        return cls(t, p, k, n, tuple(merged.stop), seed, r)
