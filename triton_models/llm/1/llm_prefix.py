"""Prefix cache: the KV of token sequences seen lately, so a prompt that starts with one skips it.

What repeats in practice: the chat template's system turn in front of every prompt, and a
chat's history, which the next turn sends again in full (the previous prompt plus the reply
just generated). Entries are whole sequences (a prompt at prefill, prompt + generated tokens
when a row finishes), per adapter (LoRA changes the keys and values), LRU-evicted within a
byte budget. A lookup returns the longest common prefix with any entry of the same adapter,
at most all but the prompt's last token (its logits are needed), so a hit is exact: causal
attention makes position i's keys and values depend on tokens 0..i only, and position ids
start at 0 either way.

Adapter names are immutable versions (the registry publishes a new folder per version), so
an entry never outlives what it was computed with.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [heads, time, head_dim]
MIN_REUSE = 4  # shorter matches are not worth building a past cache for


def _common(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.numel(), b.numel())
    if n == 0:
        return 0
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0, 0]) if diff.numel() else n


def _nbytes(kv: KV) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


class PrefixCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.used = 0
        self.entries: OrderedDict[tuple[str, tuple[int, ...]], tuple[torch.Tensor, KV, int]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def lookup(self, adapter: str, ids: list[int]) -> tuple[int, KV | None]:
        """(k, per-layer KV of the first k tokens) of the longest reusable prefix; (0, None) on a miss."""
        if not self.entries or len(ids) <= MIN_REUSE:
            return 0, None
        want = torch.tensor(ids, dtype=torch.long)
        head = tuple(ids[:MIN_REUSE])
        best, hit = 0, None
        for key, (seq, _, _) in self.entries.items():
            if key[0] == adapter and key[1][:MIN_REUSE] == head:  # cheap filter before comparing tensors
                k = min(_common(seq, want), len(ids) - 1)
                if k > best:
                    best, hit = k, key
        if hit is None or best < MIN_REUSE:
            return 0, None
        self.entries.move_to_end(hit)
        kv = self.entries[hit][1]
        return best, [(k[:, :best], v[:, :best]) for k, v in kv]

    def store(self, adapter: str, ids: list[int], kv: KV) -> None:
        """Remember `ids`' KV (tensors owned by the cache from now on); entries it extends go."""
        if not self.enabled or len(ids) <= MIN_REUSE:
            return
        size = _nbytes(kv)
        if size > self.budget:
            return
        seq = torch.tensor(ids, dtype=torch.long)
        for key in [k for k in self.entries if k[0] == adapter]:
            old = self.entries[key][0]
            common = _common(old, seq)
            if common == old.numel():
                self._drop(key)  # a prefix of the new entry (or the same): the new one answers its lookups
            elif common == seq.numel():
                self.entries.move_to_end(key)
                return  # already covered by a longer entry
        self.entries[(adapter, tuple(ids))] = (seq, kv, size)
        self.used += size
        while self.used > self.budget:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: tuple[str, tuple[int, ...]]) -> None:
        self.used -= self.entries.pop(key)[2]


def row_kv(layers: list[tuple[torch.Tensor, torch.Tensor]], row: int, cols: torch.Tensor) -> KV:
    """One row's keys/values at the time columns `cols` (its unmasked ones), as owned copies."""
    return [(k[row].index_select(1, cols), v[row].index_select(1, cols)) for k, v in layers]


def past_for(rows_kv: list[tuple[int, KV | None]], width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer [rows, heads, width, head_dim] keys/values: each row's prefix right-aligned,
    zeros in front (masked out); rows without one are all zeros."""
    ref = next(kv for _, kv in rows_kv if kv is not None)
    out = []
    for layer, (k0, v0) in enumerate(ref):
        keys = k0.new_zeros((len(rows_kv), k0.shape[0], width, k0.shape[2]))
        vals = v0.new_zeros((len(rows_kv), v0.shape[0], width, v0.shape[2]))
        for i, (n, kv) in enumerate(rows_kv):
            if kv is not None and n:
                keys[i, :, width - n :] = kv[layer][0]
                vals[i, :, width - n :] = kv[layer][1]
        out.append((keys, vals))
    return out
