"""Generated tokens → text: the byte table of the vocabulary, stop strings, streamable deltas.

Text is decoded from the bytes of all tokens so far (byte-level BPE splits UTF-8 characters
across tokens), so a delta is only streamed once it can no longer change: an incomplete UTF-8
tail and anything that may still become a stop string are held back.
"""

from __future__ import annotations

from typing import Any

from llm_request import Row


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte ↔ printable-character table that byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def token_bytes(tokenizer: Any, vocab_size: int) -> list[bytes]:
    """Bytes of every token id; special and added tokens produce no text."""
    byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
    special = set(tokenizer.all_special_ids)
    special.update(getattr(tokenizer, "added_tokens_decoder", {}).keys())
    vocab_n = len(tokenizer)
    table: list[bytes] = []
    for i in range(max(vocab_n, vocab_size)):
        tok = tokenizer.convert_ids_to_tokens(i) if i < vocab_n else None
        if tok is None or i in special:
            table.append(b"")
        elif all(ch in byte_decoder for ch in tok):
            table.append(bytes(byte_decoder[ch] for ch in tok))
        else:  # not a byte-level token: fall back to the tokenizer
            table.append(tokenizer.decode([i]).encode("utf-8"))
    return table


def update_text(row: Row) -> str:
    """Recompute row.text after a new token (a stop string finishes the row).

    Returns the delta that may be streamed now ("" for unary rows).
    """
    text = row.raw.decode("utf-8", errors="replace")
    if row.stops:
        lo = max(0, len(row.emitted) - max(len(s) for s in row.stops))
        cut = -1
        for s in row.stops:
            i = text.find(s, lo)
            if i != -1 and (cut == -1 or i < cut):
                cut = i
        if cut != -1:
            row.text = text[:cut]
            row.finish = "stop"
            return ""
    row.text = text
    if not row.stream:
        return ""
    # hold back an incomplete UTF-8 tail and anything that may start a stop string
    stable = len(text)
    while stable > 0 and text[stable - 1] == "\ufffd":
        stable -= 1
    for s in row.stops:
        for k in range(min(len(s) - 1, stable), 0, -1):
            if text[stable - k : stable] == s[:k]:
                stable -= k
                break
    stable = max(stable, len(row.emitted))
    return text[len(row.emitted) : stable]


def cut_final(row: Row) -> None:
    """At max_tokens: a stop string anywhere in the whole text still cuts it."""
    if row.stops:
        text = row.raw.decode("utf-8", errors="replace")
        cut = min((i for i in (text.find(s) for s in row.stops) if i != -1), default=-1)
        if cut != -1:
            row.text = text[:cut]
            row.finish = "stop"
