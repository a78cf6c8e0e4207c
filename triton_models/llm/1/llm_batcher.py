"""Continuous (in-flight) batching: one decode thread owns the model.

execute() only validates and queues (submit). At every step the thread admits queued rows up
to max_batch_size active rows, prefills them together (left padding, attention mask, explicit
position ids), merges their KV cache into the running batch (left-padded with zeros along
time, masked out), decodes one token for every active row and drops finished or cancelled
rows. Each row keeps its own sampling parameters and torch.Generator, so a seeded request
yields the same tokens alone or batched, whenever it joins, streamed or not. Adapters load in
this thread between steps, so PEFT state is only touched by it.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
import triton_python_backend_utils as pb_utils
from llm_adapters import AdapterCache
from llm_choices import ChoiceScorer
from llm_errors import internal, queue_full, unavailable
from llm_kvcache import cache_of, layer_tensors, map_cache, merge_cache, mergeable, pad_left, select_rows
from llm_metrics import Metrics
from llm_prefix import KV, PrefixCache, past_for, row_kv
from llm_request import Row
from llm_responses import fail, send_delta, send_error, send_final
from llm_sampling import sample
from llm_text import cut_final, token_bytes, update_text


class Batch:
    """The running batch: rows in cache order and the tensors the next decode step needs."""

    def __init__(self, rows: list[Row], cache: Any, mask: torch.Tensor, pos: torch.Tensor) -> None:
        self.rows = rows
        self.cache = cache  # KV cache, batch axis = rows, time axis = mask's columns
        self.mask = mask  # [rows, time] attention mask of the cached positions
        self.pos = pos  # [rows, 1] position id of each row's next token
        self.next_ids: list[int] = []  # tokens sampled last step, fed in the next one


def _eos_ids(tokenizer: Any, lm: Any) -> set[int]:
    eos: set[int] = set()
    for src in (tokenizer.eos_token_id, getattr(lm.generation_config, "eos_token_id", None)):
        if isinstance(src, int):
            eos.add(src)
        elif isinstance(src, (list, tuple)):
            eos.update(int(x) for x in src)
    return eos


class Batcher:
    def __init__(
        self,
        lm: Any,
        tokenizer: Any,
        adapters: AdapterCache,
        metrics: Metrics,
        *,
        max_rows: int,
        max_queue: int,
        prefix_cache_bytes: int = 0,
    ) -> None:
        self.adapters = adapters
        self.metrics = metrics
        self.max_rows = max_rows
        self.max_queue = max_queue  # requests waiting for a slot beyond this are refused
        # transformers 5.24 renamed past_key_values -> cache (old name removed in 5.40)
        fwd = inspect.signature(lm.forward).parameters
        self.cache_kw = "cache" if "cache" in fwd else "past_key_values"
        self.keep_kw = "logits_to_keep" if "logits_to_keep" in fwd else None
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.eos_ids = _eos_ids(tokenizer, lm)
        self.id_bytes = token_bytes(tokenizer, lm.config.vocab_size)  # token id -> bytes of its text
        self.choices = ChoiceScorer(tokenizer, adapters, self.pad_id)  # choice lists: scored, not decoded
        self.prefixes = PrefixCache(prefix_cache_bytes)  # KV of recent prompts/chats (llm_prefix)
        self.prefix_ok: bool | None = None  # whether this model's cache can take a past (first prefill tells)
        self.queue: deque[Row] = deque()  # validated rows waiting for a free batch slot
        self.wakeup = threading.Condition()
        self.stopping = False
        self.batch: Batch | None = None  # the running batch; touched only by the decode thread
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------------ outside the thread

    def start(self, threads: int) -> None:
        self.thread = threading.Thread(target=self._loop, args=(threads,), name="llm-decode", daemon=True)
        self.thread.start()

    def submit(self, rows: list[Row]) -> None:
        """Queue validated rows; beyond max_queue waiting they are refused (shed, not queued forever)."""
        with self.wakeup:
            if self.stopping:  # stop() already ran: nobody would decode them
                fail(rows, unavailable())
                return
            room = max(0, self.max_queue - len(self.queue))
            if len(rows) > room:
                fail(rows[room:], queue_full(self.max_queue))
                rows = rows[:room]
            if rows:
                self.queue.extend(rows)
                self.wakeup.notify()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the decode thread; every queued or running request gets a FINAL error."""
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=timeout_s)
            if self.thread.is_alive():  # stuck in a forward pass: it fails its own rows when back
                pb_utils.Logger.log_warn(f"llm: decode thread did not stop within {timeout_s:g} s")
        fail(self._drain(), unavailable())

    # ------------------------------------------------------------------ the decode thread

    def _loop(self, threads: int) -> None:
        """One step per iteration: admit queued rows, then decode one token for all rows."""
        torch.set_num_threads(max(1, threads))  # per-thread setting with OpenMP
        with torch.inference_mode():  # thread-local, so entered here
            while True:
                new = self._take()
                if new is None:
                    break
                self._guard(self._reap_queued, [])
                if new:
                    self._guard(functools.partial(self._admit, new), new)  # a failed prefill fails only its rows
                if self.batch is not None:
                    self._guard(self._step, None)
        # stopping: nothing may hang
        fail(self.batch.rows if self.batch else [], unavailable())
        self.batch = None
        fail(self._drain(), unavailable())

    def _guard(self, fn: Callable[[], None], rows: list[Row] | None) -> None:
        """Run fn; on an exception fail `rows` (None: the whole running batch) and go on."""
        try:
            fn()
        except Exception as exc:  # the decode thread must never die
            pb_utils.Logger.log_error(f"llm: generation failed: {exc!r}")
            err = internal(exc)
            if rows is None:
                fail(self.batch.rows if self.batch else [], err)
                self.batch = None
            else:
                fail(rows, err)

    def _step(self) -> None:
        assert self.batch is not None
        self.decode_step(self.batch)
        self.batch = self._prune(self.batch)

    def _take(self) -> list[Row] | None:
        """Rows to admit now (up to the free slots); blocks while idle; None when stopping."""
        with self.wakeup:
            while not self.stopping and not self.queue and self.batch is None:
                self.wakeup.wait()
            if self.stopping:
                return None
            room = self.max_rows - (len(self.batch.rows) if self.batch else 0)
            if self.batch is not None and not mergeable(self.batch.cache):
                room = 0  # this cache cannot take new rows: they wait for the batch to drain
            return [self.queue.popleft() for _ in range(min(room, len(self.queue)))]

    def _drain(self) -> list[Row]:
        with self.wakeup:
            rows = list(self.queue)
            self.queue.clear()
        return rows

    def _reap_queued(self) -> None:
        """Finish queued rows whose client gave up (deadline, disconnect) without decoding them."""
        with self.wakeup:
            waiting = list(self.queue)
        for row in waiting:
            if not row.cancelled():
                continue
            with self.wakeup:
                if row not in self.queue:  # admitted or drained meanwhile
                    continue
                self.queue.remove(row)
            row.finish = "cancelled"
            self._finalize(row)

    def _finalize(self, row: Row) -> None:
        if not row.finalized:
            self.metrics.finish(row.finish)
            send_final(row)

    # ------------------------------------------------------------------ steps

    def _admit(self, rows: list[Row]) -> None:
        """Load adapters, prefill the new rows (first token) and merge them into the batch."""
        running = self.batch.rows if self.batch else []
        names = {r.adapter for r in rows + running if r.adapter}  # running ones stay resident
        errors = self.adapters.ensure(names) if names else {}
        for r in rows:
            if r.adapter in errors:
                send_error(r, errors[r.adapter])
        rows = [r for r in rows if not r.finalized]
        rows = self.choices.divert(rows, self._finalize)  # choice rows end here (llm_choices)
        if not rows:
            return
        prefilled = self._prefill(rows)
        self.metrics.batches.increment(1)
        pb_utils.Logger.log_info(
            f"llm: admitted {len(rows)} (running {len(running)}, queued {len(self.queue)}) "
            f"adapters={sorted({r.adapter or '<base>' for r in rows})}"
        )
        new = self._prune(prefilled)
        if new is None:
            return
        self.batch = new if self.batch is None else self._merge(self.batch, new)

    def _forward(
        self, rows: list[Row], ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any
    ) -> tuple[torch.Tensor, Any]:
        """One model call; returns (last-position logits, cache)."""
        kwargs: dict[str, Any] = {self.cache_kw: cache}
        if self.keep_kw:
            kwargs[self.keep_kw] = 1
        names = self.adapters.adapter_names([r.adapter for r in rows])
        if names is not None:  # LoRA layers are injected: name every row's adapter
            kwargs["adapter_names"] = names
        out = self.adapters.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kwargs)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = out.past_key_values
        return out.logits[:, -1, :], cache

    def _prefill(self, rows: list[Row]) -> Batch:
        """The new rows' prompts in one forward; samples their first token.

        A row whose prompt starts with a cached sequence (llm_prefix) feeds only the rest: per
        row, [zeros | cached prefix] form the past and [pad | rest of the prompt] the input,
        both right-aligned, the gaps masked out and position ids counted over real tokens.
        """
        n = len(rows)
        hits: list[tuple[int, KV | None]] = [
            self.prefixes.lookup(r.adapter, r.prompt_ids) if self.prefix_ok else (0, None) for r in rows
        ]
        past = max(k for k, _ in hits)
        rest = [len(r.prompt_ids) - k for r, (k, _) in zip(rows, hits, strict=True)]
        width = max(rest)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, past + width), dtype=torch.long)
        for i, (r, (k, _)) in enumerate(zip(rows, hits, strict=True)):
            ids[i, width - rest[i] :] = torch.tensor(r.prompt_ids[k:], dtype=torch.long)
            mask[i, past - k : past] = 1
            mask[i, past + width - rest[i] :] = 1
            if r.repetition_penalty != 1.0:
                r.seen = torch.tensor(sorted(set(r.prompt_ids)), dtype=torch.long)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
        cache = cache_of(past_for(hits, past)) if past else None
        logits, cache = self._forward(rows, ids, mask, pos, cache)
        self.metrics.count(prompt=sum(len(r.prompt_ids) for r in rows), reused=sum(k for k, _ in hits))
        if self.prefix_ok is None:
            self.prefix_ok = self.prefixes.enabled and mergeable(cache) and not isinstance(cache, tuple)
        batch = Batch(rows, cache, mask, pos[:, -1:] + 1)
        for i, r in enumerate(rows):
            self._remember(batch, i, r.prompt_ids)
        batch.next_ids = self._sample_all(rows, logits)
        return batch

    def _remember(self, b: Batch, i: int, ids: list[int]) -> None:
        """Store row i's cached keys/values (its unmasked columns, which hold `ids`)."""
        if not self.prefix_ok:
            return
        cols = b.mask[i].nonzero().squeeze(1)
        if cols.numel() == len(ids):  # anything else would be a bug: store nothing rather than wrong KV
            self.prefixes.store(b.rows[i].adapter, ids, row_kv(layer_tensors(b.cache), i, cols))

    def decode_step(self, b: Batch) -> None:
        """One token for every active row (the tokens sampled last step go in)."""
        ids = torch.tensor(b.next_ids, dtype=torch.long).unsqueeze(1)
        mask = torch.cat([b.mask, torch.ones((len(b.rows), 1), dtype=torch.long)], 1)
        logits, b.cache = self._forward(b.rows, ids, mask, b.pos, b.cache)
        b.mask, b.pos = mask, b.pos + 1
        self.metrics.count(steps=1, rows=len(b.rows))
        b.next_ids = self._sample_all(b.rows, logits)
        self.metrics.flush_if_due()

    def _sample_all(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """Next token per row (pad for rows that just got cancelled); updates text/streams."""
        out: list[int] = []
        for j, r in enumerate(rows):
            if r.cancelled():
                r.finish = "cancelled"
                out.append(self.pad_id)
                continue
            tok = sample(r, logits[j])
            out.append(tok)
            self._accept(r, tok)
        self.metrics.count(tokens=sum(1 for r in rows if r.finish != "cancelled"))
        return out

    def _accept(self, r: Row, tok: int) -> None:
        r.generated.append(tok)
        if r.seen is not None:
            r.seen = torch.unique(torch.cat([r.seen, torch.tensor([tok])]))
        if tok in self.eos_ids:
            r.finish = "stop"
            r.text = r.raw.decode("utf-8", errors="replace")
            return
        r.raw += self.id_bytes[tok] if tok < len(self.id_bytes) else b""
        delta = update_text(r)
        if delta:
            send_delta(r, delta)
        if r.finish is None and len(r.generated) >= r.max_tokens:
            r.finish = "length"
            r.text = r.raw.decode("utf-8", errors="replace")
            cut_final(r)  # stop strings may still cut it

    def _prune(self, b: Batch) -> Batch | None:
        """Send FINAL for finished rows and drop them (and all-padding columns) from the cache."""
        keep = [j for j, r in enumerate(b.rows) if r.finish is None]
        if len(keep) != len(b.rows):  # counters are current by the time a client sees FINAL
            self.metrics.flush()
        for i, r in enumerate(b.rows):
            if r.finish is not None:
                self._finalize(r)
                if r.finish in ("stop", "length"):  # a chat's next turn starts with all of this
                    self._remember(b, i, r.prompt_ids + r.generated[:-1])  # the last token was never fed
        if not keep:
            return None
        if len(keep) != len(b.rows):
            idx = torch.tensor(keep, dtype=torch.long)
            b.cache = select_rows(b.cache, idx)
            b.mask, b.pos = b.mask.index_select(0, idx), b.pos.index_select(0, idx)
            b.rows = [b.rows[j] for j in keep]
            b.next_ids = [b.next_ids[j] for j in keep]
            # columns no remaining row attends to (left padding of finished rows) are dead weight
            lead = int(b.mask.any(0).long().argmax())
            if lead and mergeable(b.cache):
                b.cache = map_cache(b.cache, lambda t: t[:, :, lead:])
                b.mask = b.mask[:, lead:]
        return b

    def _merge(self, a: Batch, b: Batch) -> Batch:
        """Join two batches: left-pad the shorter along time (mask 0), stack along rows."""
        width = max(a.mask.shape[1], b.mask.shape[1])
        pad_a, pad_b = width - a.mask.shape[1], width - b.mask.shape[1]
        cache = merge_cache(a.cache, b.cache, pad_a, pad_b)
        mask = torch.cat([pad_left(a.mask, pad_a, 1), pad_left(b.mask, pad_b, 1)], 0)
        merged = Batch(a.rows + b.rows, cache, mask, torch.cat([a.pos, b.pos], 0))
        merged.next_ids = a.next_ids + b.next_ids
        return merged
