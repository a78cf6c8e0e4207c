"""A throwaway mesh on free loopback ports in a folder of its own, for the test
suite and the benchmarks (they must never touch the user's running mesh)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from llmesh.config import MeshConfig, load_config
from llmesh.demo.catalog import TEST_LM


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 right now."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class RedisServer:
    """A private redis-server on a free loopback port (no persistence) that a test can
    stop and start again on the same port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_ports(1)[0]
        self.exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        self.proc = None


def write_config(
    home: Path, overrides: dict[str, dict[str, Any]] | None = None, llm_model: str | None = TEST_LM
) -> Path:
    """A config file for a mesh living in ``home`` on fresh ports; ``overrides`` adds
    or replaces keys per section, e.g. ``{"inference": {"chat_ttl_seconds": 4}}``.
    The mesh serves ``llm_model``: the tiny random test LM unless asked otherwise
    (None: the mesh's default LM, the real one)."""
    (
        redis_port,
        t_http,
        t_grpc,
        t_metrics,
        inf_port,
        inf_metrics,
        sec_port,
        sec_metrics,
        gw_port,
        gw_metrics,
        tr_port,
        tr_metrics,
        em_port,
        em_metrics,
        re_port,
        re_metrics,
    ) = free_ports(16)
    doc: dict[str, Any] = {
        "home": str(home),
        "redis": {"port": redis_port},
        "triton": {"grpc_port": t_grpc, "http_port": t_http, "metrics_port": t_metrics},
        "security": {"server": {"port": sec_port, "metrics_port": sec_metrics, "grace_seconds": 10}},
        "trainer": {"server": {"port": tr_port, "metrics_port": tr_metrics, "grace_seconds": 10}},
        "embedding": {"server": {"port": em_port, "metrics_port": em_metrics, "grace_seconds": 10}},
        "retrieval": {"server": {"port": re_port, "metrics_port": re_metrics, "grace_seconds": 10}},
        "gateway": {
            "server": {"port": gw_port, "metrics_port": gw_metrics, "grace_seconds": 10},
            "peers": {"security": f"127.0.0.1:{sec_port}", "redis": f"redis://127.0.0.1:{redis_port}/1"},
            "upstreams": {
                "llmesh.inference.v1.Inference": f"127.0.0.1:{inf_port}",
                "llmesh.security.v1.Security": f"127.0.0.1:{sec_port}",
                "llmesh.trainer.v1.Trainer": f"127.0.0.1:{tr_port}",
                "llmesh.embedding.v1.Embedding": f"127.0.0.1:{em_port}",
                "llmesh.retrieval.v1.Retrieval": f"127.0.0.1:{re_port}",
            },
        },
        "inference": {
            "server": {"port": inf_port, "metrics_port": inf_metrics, "grace_seconds": 10},
            "peers": {"triton": f"127.0.0.1:{t_grpc}", "redis": f"redis://127.0.0.1:{redis_port}/0"},
        },
    }
    if llm_model is not None:
        doc["triton"]["llm_model"] = llm_model
    for section, values in (overrides or {}).items():
        doc[section] = {**doc.get(section, {}), **values}
    path = home / "llmesh.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def make_random_adapter(base: Path, dest: Path, seed: int = 1234) -> None:
    """A LoRA adapter (r=4 on q_proj/v_proj) with random, non-zero weights, so it
    visibly changes the base model's output. For tests and smoke checks."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(str(dest))


@contextlib.contextmanager
def ephemeral_mesh(
    home: Path, overrides: dict[str, dict[str, Any]] | None = None, timeout: float = 300
) -> Iterator[tuple[MeshConfig, Path]]:
    """Build the demo models in ``home``, bring the mesh up, yield, bring it down."""
    from llmesh.demo.models import init_models
    from llmesh.launcher import control

    home.mkdir(parents=True, exist_ok=True)
    path = write_config(home, overrides)
    cfg = load_config(path, env={})
    init_models(cfg.home, llm=None if cfg.triton.llm_path else cfg.triton.llm_model)
    try:
        control.up(cfg, config_path=path, timeout=timeout)
        yield cfg, path
    finally:
        control.down(cfg)
