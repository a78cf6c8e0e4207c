"""Inference servicer: protobuf ↔ domain, a few lines per RPC. Validation errors
and peer failures are raised as domain errors; the interceptor maps them."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import grpc

from llmesh.adapter_store import Announced
from llmesh.pb.common.v1 import types_pb2
from llmesh.pb.inference.v1 import inference_pb2 as pb
from llmesh.pb.inference.v1 import inference_pb2_grpc as pb_grpc
from llmesh.runtime.channels import remaining_timeout
from llmesh.runtime.errors import InvalidArgument, NotFound
from llmesh.runtime.identity import InternalIdentity
from llmesh.services.inference.chat_history import ChatTurns
from llmesh.services.inference.llm_backend import Chunk, GenerationInput, LlmBackend
from llmesh.services.inference.memory import ChatMemory, Message, check_conversation_id, new_conversation_id
from llmesh.services.inference.response_format import model_json, structured_pb
from llmesh.services.inference.sampling import Sampling
from llmesh.services.inference.settings import InferenceSettings
from llmesh.services.inference.templates import TemplateLibrary

# The servicer methods' context (request and response types vary per method).
Context = grpc.aio.ServicerContext[Any, Any]
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(@[A-Za-z0-9._-]{1,64})?$")
FINISH = {
    "stop": types_pb2.FINISH_REASON_STOP,
    "length": types_pb2.FINISH_REASON_LENGTH,
    "cancelled": types_pb2.FINISH_REASON_CANCELLED,
}
ROLE_TO_PB = {"system": types_pb2.ROLE_SYSTEM, "user": types_pb2.ROLE_USER, "assistant": types_pb2.ROLE_ASSISTANT}


def usage_pb(c: Chunk) -> types_pb2.Usage:
    return types_pb2.Usage(
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        total_tokens=c.prompt_tokens + c.completion_tokens,
    )


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(
        self,
        cfg: InferenceSettings,
        llm: LlmBackend,
        memory: ChatMemory,
        templates: TemplateLibrary,
        identity: InternalIdentity,
        adapters: Announced,
    ) -> None:
        self.cfg = cfg
        self.llm = llm
        self.memory = memory
        self.templates = templates
        self.identity = identity
        self.adapters = adapters
        self.chat = ChatTurns(llm, memory, cfg.max_prompt_chars)

    def _tenant(self, context: Context) -> str:
        """The caller's tenant, from the internal identity (verified, and cached, by the interceptor)."""
        return self.identity.principal(context).tenant

    # ---- validation -------------------------------------------------------
    def _text(self, value: str, field: str) -> str:
        if not value.strip():
            raise InvalidArgument(field, "must not be empty")
        if len(value) > self.cfg.max_prompt_chars:
            raise InvalidArgument(field, f"is {len(value)} characters, the limit is {self.cfg.max_prompt_chars}")
        return value

    def _adapter(self, name: str, context: Context) -> str:
        if name and not ADAPTER_NAME.match(name):
            raise InvalidArgument("adapter", "must be a name or name@version of [A-Za-z0-9._-]")
        if not name:
            return name
        # name / name@alias → the published name@vN folder (registry.json, re-read on
        # change); an A/B split picks the arm by caller, so each user sticks to one.
        p = self.identity.principal(context)
        return self.adapters.resolve(name, caller=f"{p.tenant}/{p.subject}")

    def _sampling(
        self, pb_sampling: types_pb2.SamplingParams, defaults: types_pb2.SamplingParams | None = None
    ) -> Sampling:
        return Sampling.from_pb(
            pb_sampling,
            default_max_tokens=self.cfg.default_max_tokens,
            max_tokens_limit=self.cfg.max_tokens_limit,
            defaults=defaults,
        )

    def _generation_input(self, req: pb.GenerateRequest, context: Context) -> GenerationInput:
        which = req.WhichOneof("input")
        fmt = model_json(req.response_format)  # the request's own format wins over a template's
        adapter = self._adapter(req.adapter, context)
        # raw on request, or when the adapter was trained on raw prompts (no chat template)
        raw = req.raw or (bool(adapter) and self.adapters.prompt_format(adapter) == "raw")
        if which == "prompt":
            sampling = self._sampling(req.sampling)
            prompt = self._text(req.prompt, "prompt")
        elif which == "template":
            t = self.templates.get(req.template.name)
            prompt = self._text(t.render(req.template.variables), "template.variables")
            sampling = self._sampling(req.sampling, t.sampling)
            if not fmt and (tf := t.format_for(req.template.variables)) is not None:
                fmt = model_json(tf, "template")
        else:
            raise InvalidArgument("prompt", "set either prompt or template")
        return GenerationInput(sampling, prompt=prompt, adapter=adapter, response_format=fmt, raw=raw)

    def _timeout(self, context: Context) -> float:
        return remaining_timeout(context, self.cfg.default_timeout_s)

    # ---- generation -------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context: Context) -> pb.GenerateResponse:
        inp = self._generation_input(request, context)
        c = await self.llm.complete(inp, timeout=self._timeout(context))
        return pb.GenerateResponse(
            text=c.text,
            usage=usage_pb(c),
            finish_reason=FINISH[c.finish_reason],
            model=self.llm.model,
            adapter=inp.adapter,
            structured=structured_pb(c.structured),
        )

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        inp = self._generation_input(request, context)
        async for c in self.llm.stream(inp, timeout=self._timeout(context)):
            if c.finish_reason:
                yield pb.GenerateStreamResponse(
                    text_delta=c.text,
                    usage=usage_pb(c),
                    finish_reason=FINISH[c.finish_reason],
                    structured=structured_pb(c.structured),
                )
            elif c.text:
                yield pb.GenerateStreamResponse(text_delta=c.text)

    # ---- chat -------------------------------------------------------------
    async def _chat_turn(self, req: pb.ChatRequest, context: Context, cid: str) -> AsyncIterator[tuple[Chunk, int]]:
        message = self._text(req.message, "message")
        sampling = self._sampling(req.sampling)
        adapter = self._adapter(req.adapter, context)
        fmt = model_json(req.response_format)
        turn = self.chat.stream(
            self._tenant(context),
            cid,
            message,
            req.system_prompt,
            sampling,
            adapter,
            self._timeout(context),
            response_format=fmt,
        )
        async for item in turn:
            yield item

    def _conversation_id(self, req: pb.ChatRequest) -> str:
        return check_conversation_id(req.conversation_id) if req.conversation_id else new_conversation_id()

    async def Chat(self, request: pb.ChatRequest, context: Context) -> pb.ChatResponse:
        cid = self._conversation_id(request)
        parts: list[str] = []
        async for c, kept in self._chat_turn(request, context, cid):
            parts.append(c.text)
            if c.finish_reason:
                return pb.ChatResponse(
                    conversation_id=cid,
                    reply=types_pb2.ChatMessage(role=types_pb2.ROLE_ASSISTANT, content="".join(parts)),
                    usage=usage_pb(c),
                    finish_reason=FINISH[c.finish_reason],
                    history_length=kept,
                    structured=structured_pb(c.structured),
                )
        raise AssertionError("unreachable: the backend always ends with a final chunk")

    async def _chat_stream(
        self, request: pb.ChatRequest, context: Context, cid: str
    ) -> AsyncIterator[pb.ChatStreamResponse]:
        async for c, kept in self._chat_turn(request, context, cid):
            if c.finish_reason:
                yield pb.ChatStreamResponse(
                    conversation_id=cid,
                    text_delta=c.text,
                    usage=usage_pb(c),
                    finish_reason=FINISH[c.finish_reason],
                    history_length=kept,
                    structured=structured_pb(c.structured),
                )
            elif c.text:
                yield pb.ChatStreamResponse(conversation_id=cid, text_delta=c.text)

    async def ChatStream(self, request: pb.ChatRequest, context: Context) -> AsyncIterator[pb.ChatStreamResponse]:
        async for msg in self._chat_stream(request, context, self._conversation_id(request)):
            yield msg

    async def Converse(
        self, request_iterator: AsyncIterator[pb.ChatRequest], context: Context
    ) -> AsyncIterator[pb.ChatStreamResponse]:
        cid = ""
        async for request in request_iterator:
            cid = self._conversation_id(request) if request.conversation_id or not cid else cid
            async for msg in self._chat_stream(request, context, cid):
                yield msg

    async def GetConversation(self, request: pb.GetConversationRequest, context: Context) -> pb.Conversation:
        cid = check_conversation_id(request.conversation_id)
        history = await self.memory.load(self._tenant(context), cid)
        if history is None:
            raise NotFound("conversation", cid)
        messages = (
            [types_pb2.ChatMessage(role=types_pb2.ROLE_SYSTEM, content=history.system)] if history.system else []
        ) + [types_pb2.ChatMessage(role=ROLE_TO_PB[m.role], content=m.content) for m in history.messages]
        return pb.Conversation(conversation_id=cid, messages=messages, ttl_seconds=history.ttl_seconds)

    async def DeleteConversation(
        self, request: pb.DeleteConversationRequest, context: Context
    ) -> pb.DeleteConversationResponse:
        return pb.DeleteConversationResponse(
            deleted=await self.memory.delete(self._tenant(context), check_conversation_id(request.conversation_id))
        )

    # ---- templates and models ---------------------------------------------
    async def ListTemplates(self, request: pb.ListTemplatesRequest, context: Context) -> pb.ListTemplatesResponse:
        return pb.ListTemplatesResponse(
            templates=[
                pb.TemplateInfo(
                    name=t.name,
                    description=t.description,
                    variables=t.variables,
                    sampling=t.sampling,
                    response_format=t.response_format,
                )
                for t in self.templates
            ]
        )

    async def RenderTemplate(self, request: pb.TemplateInput, context: Context) -> pb.RenderTemplateResponse:
        t = self.templates.get(request.name)
        return pb.RenderTemplateResponse(prompt=t.render(request.variables, field="variables"))

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[pb.ModelInfo(name=n, version=v, ready=r) for n, v, r in await self.llm.models()]
        )


__all__ = ["InferenceServicer", "Message"]
