"""OpenAI-compatible endpoints: ``/v1/models``, ``/v1/models/<model>``, ``/v1/completions``,
``/v1/chat/completions`` (``model`` is the function's name). They run on the same invocation
path as ``/v1/functions/<name>/invocations``; streams send SSE keep-alive comments during a cold
start and cancel the invocation when the client goes away."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

from flask import Blueprint, Response, g
from pydantic import ValidationError

from gpu_runtime.tokenizer import Tokenizer
from hydraserve.api import openai_logprobs
from hydraserve.api.context import db, extension
from hydraserve.api.openapi import operation, validation_error
from hydraserve.api.views.invocations import start
from hydraserve.errors import InvalidRequest, NotFound, ServiceUnavailable
from hydraserve.functions import service as functions
from hydraserve.invocations import service as invocations
from hydraserve.invocations.replies import Waiter
from hydraserve.invocations.schemas import (
    OPENAI_DEFAULT_MAX_TOKENS,
    OPENAI_SAMPLING,
    ChatRequest,
    CompletionRequest,
    InvokeRequest,
    OpenAIBase,
)

bp = Blueprint("openai", __name__)
DEADLINE_S = 600.0


def model_object(fn, max_model_len: int | None) -> dict:
    return {"id": fn.name, "object": "model", "created": int(fn.created_at.timestamp()),
            "owned_by": g.principal.tenant_name, "max_model_len": max_model_len}


@operation(bp, "/v1/models", "GET", summary="Your functions, as OpenAI models")
def list_models():
    fns = functions.list_functions(db(), g.principal, 500, 0)
    lengths = functions.context_lengths(db(), g.principal)
    return {"object": "list", "data": [model_object(f, lengths.get(f.name)) for f in fns]}


@operation(bp, "/v1/models/<model>", "GET", summary="One function, as an OpenAI model",
           path_params={"model": {"type": "string", "maxLength": 200}})
def retrieve_model(model: str):
    try:
        fn = functions.get_function(db(), g.principal, model)
    except (NotFound, InvalidRequest):  # a name no function can have does not exist either
        raise missing_model(model) from None
    return model_object(fn, functions.context_lengths(db(), g.principal).get(fn.name))


def missing_model(model: str) -> NotFound:
    return NotFound(f"model {model[:80]!r} does not exist; GET /v1/models lists your "
                    "functions", "model")


@operation(bp, "/v1/completions", "POST", summary="OpenAI-compatible completion",
           body=CompletionRequest)
def completions(body: CompletionRequest):
    key = "prompt_ids" if isinstance(body.prompt, list) else "prompt"
    return run(body, "completion", {key: body.prompt})


@operation(bp, "/v1/chat/completions", "POST", summary="OpenAI-compatible chat completion",
           body=ChatRequest)
def chat_completions(body: ChatRequest):
    return run(body, "chat", {"messages": [m.native() for m in body.messages]})


def run(body: OpenAIBase, kind: str, inputs: dict):
    try:
        request = InvokeRequest.model_validate(inputs | body.sampling(OPENAI_DEFAULT_MAX_TOKENS))
    except ValidationError as exc:
        raise validation_error(exc) from None
    tok = tokenizer(body) if request.logprobs or echoes_ids(body) else None
    try:
        _fn, inv, waiter = start(body.model, request, kind, follow=True, stream=body.stream,
                                 fallback=OPENAI_SAMPLING)
    except NotFound:
        raise missing_model(body.model) from None
    shape = Shape(kind, inv.id, body.model, int(time.time()), tok, echo_text(body, tok),
                  request.logprobs)
    if body.stream:
        return Response(stream(waiter, shape, body.include_usage),
                        mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})
    return complete(waiter, shape)


def echoes_ids(body: OpenAIBase) -> bool:
    """The prompt's text is needed (``echo``) but it came as token ids."""
    return isinstance(body, CompletionRequest) and body.echo and isinstance(body.prompt, list)


def tokenizer(body: OpenAIBase) -> Tokenizer | None:
    """The model's tokenizer (cached per process; admission has just read it too)."""
    try:
        target = functions.get_target(db(), g.principal, body.model)
    except NotFound:
        raise missing_model(body.model) from None
    return extension().tokenizers.get(target)


def echo_text(body: OpenAIBase, tok: Tokenizer | None) -> str:
    """The prompt's text, put before each choice's text by ``echo``."""
    if not isinstance(body, CompletionRequest) or not body.echo:
        return ""
    if isinstance(body.prompt, str):
        return body.prompt
    if tok is None:
        raise InvalidRequest("echo of token ids needs the model's tokenizer.json; send the "
                             "prompt as text", "echo")
    return tok.decode(body.prompt, skip_special_tokens=False)


class Shape:
    """OpenAI's response objects for one request."""

    def __init__(self, kind: str, inv_id: str, model: str, created: int,
                 tok: Tokenizer | None = None, echo: str = "", logprobs: bool = False) -> None:
        chat = kind == "chat"
        self.chat, self.model, self.created = chat, model, created
        self.id = ("chatcmpl-" if chat else "cmpl-") + inv_id.removeprefix("inv_")
        self.object = "chat.completion" if chat else "text_completion"
        self.tok, self.echo, self.logprobs = tok, echo, logprobs

    def choice(self, text: str, finish_reason: str | None, chunk: bool, first: bool = False,
               index: int = 0, tokens: dict | None = None) -> dict:
        """One choice; ``tokens``: the worker's per-token record of what ``text`` holds (its
        ``token_ids``, ``logprobs``, ...), rendered when logprobs were asked for."""
        logprobs = self._logprobs(tokens) if self.logprobs and tokens else None
        if not self.chat:
            text = (self.echo if first else "") + text
            return {"index": index, "text": text, "finish_reason": finish_reason,
                    "logprobs": logprobs}
        if chunk:
            delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text else {})
            return {"index": index, "delta": delta, "finish_reason": finish_reason,
                    "logprobs": logprobs}
        return {"index": index, "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason, "logprobs": logprobs}

    def _logprobs(self, tokens: dict) -> dict:
        record = openai_logprobs.TokenLogprobs.of(tokens)
        if self.chat:
            return openai_logprobs.chat(self.tok, record)
        return openai_logprobs.completion(self.tok, record, len(self.echo))

    def body(self, choice: dict | list[dict], chunk: bool, usage: dict | None = None) -> dict:
        obj = self.object + (".chunk" if chunk and self.chat else "")
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
               "choices": choice if isinstance(choice, list) else [choice]}
        return out | ({"usage": usage} if usage else {})


def output_choices(output: dict | None) -> list[dict]:
    """The worker's choices (``n`` of them); an output from before ``n`` is choice 0."""
    output = output or {}
    return output.get("choices") or [{"index": 0} | output]


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
    choices = [shape.choice(c.get("text", ""), c.get("finish_reason"), False, True,
                            c["index"], c) for c in output_choices(inv.output)]
    return shape.body(choices, False, usage(inv))


def stream(waiter: Waiter, shape: Shape, include_usage: bool = False) -> Iterator[str]:
    """Chunks of each choice as its tokens come (a chunk holds one choice, named by its index),
    then each choice's last chunk with its finish reason; with ``include_usage``, one more
    chunk with no choices and the usage (OpenAI's ``stream_options``)."""
    done = False
    sent: dict[int, str] = {}  # text streamed per choice; a choice not in it has had no chunk
    try:
        for event in waiter.follow(DEADLINE_S):
            if event is None:
                yield ": keep-alive\n\n"  # cold start in progress; clients skip comments
                continue
            if event["type"] == "error":
                break
            index = event.get("choice", 0)
            if event["type"] == "token" and (event["text"] or index not in sent
                                             or (shape.logprobs and event["token_ids"])):
                chunk = shape.body(shape.choice(event["text"], None, True, index not in sent,
                                                index, event), True)
                sent[index] = sent.get(index, "") + event["text"]
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
        for c in output_choices(inv.output):
            i, text, streamed = c["index"], c.get("text", ""), sent.get(c["index"], "")
            rest = text[len(streamed):] if text.startswith(streamed) else ""  # held back
            final = shape.body(shape.choice(rest, c.get("finish_reason") or "stop", True,
                                            i not in sent, i), True)
            yield f"data: {json.dumps(final)}\n\n"
        if include_usage:
            yield f"data: {json.dumps(shape.body([], True, usage(inv)))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        waiter.close()
        if not done and not waiter.diverged:  # the client went away: stop generating
            waiter.cancel()
