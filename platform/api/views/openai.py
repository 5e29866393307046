"""OpenAI-compatible endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``
(``model`` is the function's name). They run on the same invocation path as
``/v1/functions/<name>/invocations``; streams send SSE keep-alive comments during a cold start
and cancel the invocation when the client goes away."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

from flask import Blueprint, Response, g
from pydantic import ValidationError

from hydraserve.api.context import db
from hydraserve.api.openapi import operation, validation_error
from hydraserve.api.views.invocations import start
from hydraserve.errors import InvalidRequest, NotFound, ServiceUnavailable
from hydraserve.functions import service as functions
from hydraserve.invocations import service as invocations
from hydraserve.invocations.replies import Waiter
from hydraserve.invocations.schemas import (
    OPENAI_DEFAULT_MAX_TOKENS,
    ChatRequest,
    CompletionRequest,
    InvokeRequest,
    OpenAIBase,
)

bp = Blueprint("openai", __name__)
DEADLINE_S = 600.0


@operation(bp, "/v1/models", "GET", summary="Your functions, as OpenAI models")
def list_models():
    fns = functions.list_functions(db(), g.principal, 500, 0)
    return {"object": "list", "data": [
        {"id": f.name, "object": "model", "created": int(f.created_at.timestamp()),
         "owned_by": g.principal.tenant_name} for f in fns]}


@operation(bp, "/v1/completions", "POST", summary="OpenAI-compatible completion",
           body=CompletionRequest)
def completions(body: CompletionRequest):
    key = "prompt_ids" if isinstance(body.prompt, list) else "prompt"
    return run(body, "completion", {key: body.prompt})


@operation(bp, "/v1/chat/completions", "POST", summary="OpenAI-compatible chat completion",
           body=ChatRequest)
def chat_completions(body: ChatRequest):
    messages = [m.model_dump() for m in body.messages]
    return run(body, "chat", {"messages": messages})


def run(body: OpenAIBase, kind: str, inputs: dict):
    try:
        request = InvokeRequest.model_validate(inputs | body.sampling(OPENAI_DEFAULT_MAX_TOKENS))
    except (ValidationError, ValueError) as exc:
        raise (validation_error(exc) if isinstance(exc, ValidationError)
               else InvalidRequest(str(exc), "stop")) from None
    try:
        _fn, inv, waiter = start(body.model, request, kind, follow=True, stream=body.stream)
    except NotFound:
        raise NotFound(f"model {body.model!r} does not exist; GET /v1/models lists your "
                       "functions", "model") from None
    shape = Shape(kind, inv.id, body.model, int(time.time()))
    if body.stream:
        return Response(stream(waiter, shape), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache"})
    return complete(waiter, shape)


class Shape:
    """OpenAI's response objects for one request."""

    def __init__(self, kind: str, inv_id: str, model: str, created: int) -> None:
        chat = kind == "chat"
        self.chat, self.model, self.created = chat, model, created
        self.id = ("chatcmpl-" if chat else "cmpl-") + inv_id.removeprefix("inv_")
        self.object = "chat.completion" if chat else "text_completion"

    def choice(self, text: str, finish_reason: str | None, chunk: bool, first: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        if chunk:
            delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return {"index": 0, "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason}

    def body(self, choice: dict, chunk: bool, usage: dict | None = None) -> dict:
        obj = self.object + (".chunk" if chunk and self.chat else "")
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
               "choices": [choice]}
        return out | ({"usage": usage} if usage else {})


def usage(inv) -> dict:
    tin, tout = inv.tokens_in or 0, inv.tokens_out or 0
    return {"prompt_tokens": tin, "completion_tokens": tout, "total_tokens": tin + tout}


def complete(waiter: Waiter, shape: Shape):
    inv = waiter.wait(DEADLINE_S)
    if inv.status == "failed":
        err = inv.error or {}
        status = 400 if err.get("type") == "invalid_request_error" else 503
        return {"error": err}, status
    if inv.status != "succeeded":
        waiter.cancel()
        raise ServiceUnavailable(f"invocation {inv.id} did not finish in {DEADLINE_S:.0f} s")
    out = inv.output or {}
    return shape.body(shape.choice(out.get("text", ""), out.get("finish_reason"), False),
                      False, usage(inv))


def stream(waiter: Waiter, shape: Shape) -> Iterator[str]:
    done, first, sent = False, True, ""
    try:
        for event in waiter.follow(DEADLINE_S):
            if event is None:
                yield ": keep-alive\n\n"  # cold start in progress; clients skip comments
                continue
            if event["type"] == "error":
                break
            if event["type"] == "token" and (event["text"] or first):
                chunk = shape.body(shape.choice(event["text"], None, True, first), True)
                first, sent = False, sent + event["text"]
                yield f"data: {json.dumps(chunk)}\n\n"
        if waiter.diverged:  # the retry's output is stored; this stream cannot continue it
            error = {"type": "service_unavailable", "param": None, "message": waiter.diverged}
            yield f"data: {json.dumps({'error': error})}\n\ndata: [DONE]\n\n"
            return
        inv = waiter.load()
        done = invocations.is_finished(inv)
        if inv.status != "succeeded":  # failed, cancelled, or out of time: say so, not "stop"
            error = inv.error or {"type": "service_unavailable", "param": None,
                                  "message": f"invocation {inv.id} ended {inv.status}"}
            yield f"data: {json.dumps({'error': error})}\n\ndata: [DONE]\n\n"
            return
        reason = (inv.output or {}).get("finish_reason", "stop")
        text = (inv.output or {}).get("text", "")
        rest = text[len(sent):] if text.startswith(sent) else ""  # held back by the worker
        final = shape.body(shape.choice(rest, reason, True, first), True, usage(inv))
        yield f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n"
    finally:
        waiter.close()
        if not done and not waiter.diverged:  # the client went away: stop generating
            waiter.cancel()

