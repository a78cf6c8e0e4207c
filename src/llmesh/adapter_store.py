"""The shared adapter store (``LLMESH_HOME/adapters``), as the trainer publishes to it
and the inference services read it: one folder per adapter version (``name@vN``,
loaded lazily by every Triton replica) and ``registry.json``, the announcement of
versions, aliases and A/B splits, replaced atomically on every change."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from llmesh.runtime.errors import NotFound

ANNOUNCEMENT = "registry.json"
DEFAULT_ALIAS = "live"
#: How an adapter's training prompts were built: the chat template around them (the
#: default), or the text as it is. Serving sends the prompt the same way.
PROMPT_FORMATS = ("chat", "raw")


def folder(name: str, version: int) -> str:
    return f"{name}@v{version}"


class Announced:
    """The inference side: ``name`` / ``name@alias`` / ``name@vN`` to the folder name the
    Triton model loads, from ``registry.json`` (re-read when it changes). Names the
    registry does not know are passed through (plain PEFT folders in the store)."""

    def __init__(self, store: Path) -> None:
        self.path = store / ANNOUNCEMENT
        self._stamp: int | None = None
        self._doc: dict[str, dict[str, Any]] = {}

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            stamp = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return {}
        if stamp != self._stamp:
            self._doc = json.loads(self.path.read_text()).get("adapters", {})
            self._stamp = stamp
        return self._doc

    def resolve(self, ref: str, caller: str = "") -> str:
        """The folder to load for ``ref``. Where ``name@alias`` has an A/B split, the
        arm is chosen by a hash of (caller, name, alias): the same caller always gets
        the same version while the split is unchanged, and callers spread by weight."""
        name, _, tag = ref.partition("@")
        entry = self._load().get(name)
        if entry is None:
            return ref
        if re.fullmatch(r"v[0-9]+", tag):
            return ref
        alias = tag or DEFAULT_ALIAS
        arms = entry.get("splits", {}).get(alias)
        if arms:
            return folder(name, pick_arm(arms, f"{caller}\x00{name}@{alias}"))
        version = entry["aliases"].get(alias)
        if version is None:
            if tag:
                raise NotFound("adapter alias", ref)
            if not entry["versions"]:
                raise NotFound("adapter", ref)
            version = max(entry["versions"])
        return folder(name, int(version))

    def prompt_format(self, resolved: str) -> str:
        """``chat`` or ``raw``: the prompt format the adapter ``resolved`` (a folder name as
        :meth:`resolve` returns it, ``name@vN``) was trained with. Versions the registry
        does not announce as raw, and folders it does not know, are ``chat``."""
        name, _, tag = resolved.partition("@")
        entry = self._load().get(name)
        if entry is None or not re.fullmatch(r"v[0-9]+", tag):
            return "chat"
        fmt = entry.get("prompt_formats", {}).get(tag[1:], "chat")
        return fmt if fmt in PROMPT_FORMATS else "chat"


def pick_arm(arms: list[list[float]], key: str) -> int:
    """A version from ``[[version, weight], ...]``, deterministic in ``key``."""
    point = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    total = sum(w for _, w in arms)
    acc = 0.0
    for version, weight in arms:
        acc += weight / total
        if point < acc:
            return int(version)
    return int(arms[-1][0])
