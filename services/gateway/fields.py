"""Apply masking to the fields a proto marks sensitive, and restore reversible ones.

The policy is read from ``llmesh.common.v1.field_policy`` on each field: PII text is
masked before it leaves the gateway (pseudonymized where ``reversible``), and
placeholders are restored in the reversible fields of the response for the caller."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from llmesh.pb.common.v1 import options_pb2
from llmesh.services.gateway.masking import Masker, Vault

PII = options_pb2.SENSITIVITY_PII
# (field, reversible) for the string fields to treat, and message fields to descend into.
Plan = tuple[tuple[tuple[FieldDescriptor, bool], ...], tuple[FieldDescriptor, ...]]


def message_class(descriptor: Descriptor) -> type[Message]:
    return GetMessageClass(descriptor)


@cache
def _plan(descriptor: Descriptor) -> Plan:
    texts, nested = [], []
    for f in descriptor.fields:
        policy = f.GetOptions().Extensions[options_pb2.field_policy]
        if f.type == FieldDescriptor.TYPE_STRING and policy.sensitivity == PII:
            texts.append((f, policy.reversible))
        elif f.message_type is not None:
            if f.message_type.GetOptions().map_entry:
                value = f.message_type.fields_by_name["value"]
                vp = f.GetOptions().Extensions[options_pb2.field_policy]
                if value.type == FieldDescriptor.TYPE_STRING and vp.sensitivity == PII:
                    texts.append((f, vp.reversible))
            elif _touches_pii(f.message_type, set()):
                nested.append(f)
    return tuple(texts), tuple(nested)


def _touches_pii(d: Descriptor, seen: set[str]) -> bool:
    if d.full_name in seen:
        return False
    seen.add(d.full_name)
    for f in d.fields:
        if f.GetOptions().Extensions[options_pb2.field_policy].sensitivity == PII:
            return True
        if f.message_type is not None and _touches_pii(f.message_type, seen):
            return True
    return False


def has_pii(descriptor: Descriptor) -> bool:
    texts, nested = _plan(descriptor)
    return bool(texts or nested)


# fn(text, reversible, key): key names a top-level singular string field (the kind a
# streamed delta is), None elsewhere.
Apply = Callable[[str, bool, str | None], str]


def _walk(msg: Message, fn: Apply, reversible_only: bool, top: bool = True) -> None:
    texts, nested = _plan(msg.DESCRIPTOR)
    for f, reversible in texts:
        if reversible_only and not reversible:
            continue
        if f.message_type is not None:  # map<string, string>
            m = getattr(msg, f.name)
            for k in list(m):
                m[k] = fn(m[k], reversible, None)
        elif f.is_repeated:
            values = getattr(msg, f.name)
            values[:] = [fn(v, reversible, None) for v in values]
        else:
            old = getattr(msg, f.name)
            present = msg.HasField(f.name) if f.has_presence else bool(old)
            # Top-level plain strings are visited even when empty: a delta may be empty
            # now and receive a piece carried over from the previous one.
            if present or (top and not f.has_presence):
                new = fn(old, reversible, f.name if top else None)
                if new != old:
                    setattr(msg, f.name, new)
    for f in nested:
        if f.is_repeated:
            for child in getattr(msg, f.name):
                _walk(child, fn, reversible_only, False)
        elif msg.HasField(f.name):
            _walk(getattr(msg, f.name), fn, reversible_only, False)


def mask_message(msg: Message, masker: Masker, vault: Vault) -> dict[str, int]:
    """Mask PII fields in place; returns entity counts (never values) for the audit."""
    counts: dict[str, int] = {}

    def apply(text: str, reversible: bool, _key: str | None) -> str:
        if not text:
            return text
        masked, findings = masker.mask(text, vault, reversible=reversible)
        for k, v in masker.summary(findings).items():
            counts[k] = counts.get(k, 0) + v
        return masked

    _walk(msg, apply, reversible_only=False)
    return counts


def restore_message(msg: Message, vault: Vault) -> None:
    """Put the caller's own values back into the reversible PII fields of a response."""
    _walk(msg, lambda text, _r, _k: vault.restore(text), reversible_only=True)


class StreamRestorer:
    """Restores placeholders in a stream of responses whose top-level text fields are
    deltas: a placeholder the model emits across two deltas (``"<PHO"`` + ``"NE_1>"``)
    is held back at the cut and restored whole in the next message; ``tail`` returns
    what is still held when the stream ends."""

    def __init__(self, vault: Vault) -> None:
        self.vault = vault
        self._carry: dict[str, str] = {}

    def restore(self, msg: Message) -> None:
        def apply(text: str, _reversible: bool, key: str | None) -> str:
            if key is None:
                return self.vault.restore(text)
            text = self._carry.pop(key, "") + text
            cut = self.vault.partial_tail(text)
            if cut < len(text):
                self._carry[key] = text[cut:]
            return self.vault.restore(text[:cut])

        _walk(msg, apply, reversible_only=True)

    def tail(self, cls: type[Message]) -> Message | None:
        """A last message with the held-back text (an unfinished placeholder stays as
        the model wrote it), or None when nothing is held."""
        if not self._carry:
            return None
        msg = cls(**self._carry)
        self._carry.clear()
        return msg
