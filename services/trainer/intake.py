"""Dataset intake: the bytes a client uploaded or named on the host, checked, parsed,
split and stored under their content id (``trainer_dir/datasets/<id>/{train,eval}.jsonl``
plus a row in the store)."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path

from llmesh.runtime.errors import InvalidArgument
from llmesh.runtime.files import publish_dir
from llmesh.runtime.paths import resolve_within
from llmesh.runtime.sqlite import Database
from llmesh.services.trainer import datasets, store

# An upload over the limit is still read up to this many times the limit before the refusal.
DRAIN_FACTOR = 4
# Format detection looks at this much of the file.
DETECT_BYTES = 4096
DEFAULT_EVAL_FRACTION = 0.1  # the proto's "0: 0.1"


@dataclass(frozen=True)
class DatasetSpec:
    """What the client says about its dataset (the upload header)."""

    name: str
    fmt: str | None  # None: detected from the name and content
    sha256: str  # hex digest of the bytes as sent; "" when the client did not say
    eval_fraction: float  # 0: DEFAULT_EVAL_FRACTION
    seed: int


class UploadBuffer:
    """An upload's chunks, kept up to ``limit`` bytes in all.

    Past the limit nothing more is kept, but the stream is read on (up to DRAIN_FACTOR x the
    limit) and refused at its end: gRPC clients still sending when the server answers
    report INTERNAL instead of the refusal.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._chunks: list[bytes] = []

    def _too_big(self) -> InvalidArgument:
        return InvalidArgument("data", f"the dataset is larger than the limit of {self.limit} bytes")

    @property
    def started(self) -> bool:
        return self.size > 0 or bool(self._chunks)

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > DRAIN_FACTOR * self.limit:
            raise self._too_big()
        if self.size <= self.limit:
            self._chunks.append(chunk)

    def data(self) -> bytes:
        if self.size > self.limit:
            raise self._too_big()
        return b"".join(self._chunks)


def read_import(root: Path, user_path: str, limit: int) -> bytes:
    """The bytes of a dataset file on the trainer's host, which must lie inside ``root``."""
    if not user_path:
        raise InvalidArgument("path", "must not be empty")
    path = resolve_within(root, user_path, what="dataset")
    if path.stat().st_size > limit:
        raise InvalidArgument("path", f"the file is larger than the limit of {limit} bytes")
    return path.read_bytes()


class DatasetIntake:
    def __init__(self, db: Database, folder: Path, languages: datasets.Languages) -> None:
        self.db = db
        self.folder = folder  # trainer_dir/datasets
        self.languages = languages

    async def store(self, spec: DatasetSpec, data: bytes, created_by: str) -> sqlite3.Row:
        """Check, parse, split and store a dataset; the same content always gets the same id."""
        if not spec.name.strip():
            raise InvalidArgument("header.name", "must not be empty")
        if not data.strip():
            raise InvalidArgument("data", "empty dataset: no content received")
        digest = hashlib.sha256(data).hexdigest()
        if spec.sha256 and spec.sha256.lower() != digest:
            raise InvalidArgument("header.sha256", f"does not match the data received ({digest})")
        fmt = spec.fmt or datasets.detect_format(spec.name, data[:DETECT_BYTES])
        parsed = await asyncio.to_thread(datasets.parse, data, fmt, languages=self.languages)
        datasets.validate(parsed)
        train, evals = datasets.split(parsed.examples, spec.eval_fraction or DEFAULT_EVAL_FRACTION, spec.seed)
        dataset_id = datasets.content_hash(parsed.examples)[:24]
        await asyncio.to_thread(self._write, dataset_id, train, evals)
        return await self.db.call(
            lambda c: store.insert_dataset(
                c,
                dataset_id,
                name=spec.name,
                fmt=parsed.format,
                train_examples=len(train),
                eval_examples=len(evals),
                duplicates=parsed.duplicates,
                sha256=digest,
                created_by=created_by,
            )
        )

    def _write(self, dataset_id: str, train: list[datasets.Example], evals: list[datasets.Example]) -> None:
        target = self.folder / dataset_id
        if target.is_dir():
            return
        # Written completely, then renamed into place.
        tmp = target.with_name(f".{dataset_id}.{uuid.uuid4().hex}")
        tmp.mkdir(parents=True)
        (tmp / "train.jsonl").write_bytes(datasets.to_jsonl(train))
        (tmp / "eval.jsonl").write_bytes(datasets.to_jsonl(evals))
        try:
            publish_dir(tmp, target)  # fsynced first: after a crash the folder is complete or absent
        except OSError:  # the same content arrived concurrently
            pass
