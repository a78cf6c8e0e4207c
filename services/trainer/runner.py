"""Runs queued jobs one at a time, each in a worker process
(``llmesh.services.trainer.worker``), and decides what a worker's exit means:
a final state it recorded, an interruption to resume, or a crash to retry from the
last checkpoint (up to ``trainer.max_attempts`` starts in all)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sqlite3
import sys
import time

from llmesh.config import MeshConfig
from llmesh.runtime.sqlite import Database, transaction
from llmesh.services.trainer.store import TERMINAL, add_event, known_job_row
from llmesh.services.trainer.worker import EXIT_INTERRUPTED

log = logging.getLogger("llmesh.trainer.runner")


class JobRunner:
    def __init__(self, cfg: MeshConfig, db: Database) -> None:
        self.cfg = cfg
        self.db = db
        self.wake = asyncio.Event()
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        def requeue(conn: sqlite3.Connection) -> int:
            with transaction(conn):  # a job running when the service stopped resumes from its checkpoint
                n = conn.execute("UPDATE jobs SET state = 'queued' WHERE state = 'running'").rowcount
            return n

        if await self.db.call(requeue):
            log.info("resuming interrupted jobs")
        self._task = asyncio.create_task(self._loop())

    async def _next(self) -> str | None:
        row = await self.db.call(
            lambda c: c.execute("SELECT job_id FROM jobs WHERE state = 'queued' ORDER BY created_at LIMIT 1").fetchone()
        )
        return row["job_id"] if row else None

    async def _loop(self) -> None:
        while not self._stopping:
            job_id = await self._next()
            if job_id is None:
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), 5.0)
                except TimeoutError:
                    pass
                continue
            try:
                await self._run(job_id)
            except Exception:  # keep the runner alive; the job's state says what happened
                log.exception("job runner error", extra={"fields": {"job_id": job_id}})
                await asyncio.sleep(1.0)

    async def _run(self, job_id: str) -> None:
        def claim(conn: sqlite3.Connection) -> int:
            with transaction(conn):
                conn.execute("UPDATE jobs SET state = 'running', attempts = attempts + 1 WHERE job_id = ?", (job_id,))
            return int(known_job_row(conn, job_id)["attempts"])

        attempt = await self.db.call(claim)
        folder = self.cfg.trainer_dir / "jobs" / job_id
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "worker.log", "ab") as out:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "llmesh.services.trainer.worker", job_id, stdout=out, stderr=out
            )
        log.info("worker started", extra={"fields": {"job_id": job_id, "pid": self._proc.pid, "attempt": attempt}})
        code = await self._proc.wait()
        self._proc = None
        tail = (folder / "worker.log").read_text(errors="replace")[-600:]

        def settle(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                row = known_job_row(conn, job_id)
                if row["state"] in TERMINAL:
                    return
                if code == EXIT_INTERRUPTED:
                    conn.execute(
                        "UPDATE jobs SET state = 'queued', attempts = attempts - 1 WHERE job_id = ?", (job_id,)
                    )
                elif row["attempts"] >= self.cfg.trainer.max_attempts:
                    error = f"worker exited with code {code} on attempt {row['attempts']}: {tail.strip()[-300:]}"
                    conn.execute(
                        "UPDATE jobs SET state = 'failed', error = ?, finished_at = ? WHERE job_id = ?",
                        (error, time.time(), job_id),
                    )
                    add_event(conn, job_id, "failed", error)
                else:
                    conn.execute("UPDATE jobs SET state = 'queued' WHERE job_id = ?", (job_id,))
                    add_event(
                        conn, job_id, "crashed", f"worker exited with code {code}; resuming from the last checkpoint"
                    )

        await self.db.call(settle)
        log.info("worker exited", extra={"fields": {"job_id": job_id, "code": code}})

    async def close(self, grace_s: float = 20.0) -> None:
        """Checkpoint and stop a running worker (it resumes on the next start)."""
        self._stopping = True
        self.wake.set()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                proc.kill()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, grace_s)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
