"""Invocations: sync (202 after a deadline), async (``Prefer: respond-async``), SSE streams."""

from __future__ import annotations

import json
from collections.abc import Iterator

from flask import Blueprint, Response, g, request

from hydraserve.api.context import db, extension
from hydraserve.api.openapi import operation
from hydraserve.cluster import service as cluster
from hydraserve.cluster.schemas import GroupOut, group_out
from hydraserve.errors import InvalidRequest
from hydraserve.functions import servable
from hydraserve.functions import service as functions
from hydraserve.invocations import admission
from hydraserve.invocations import service as invocations
from hydraserve.invocations.replies import Waiter
from hydraserve.invocations.schemas import InvocationOut, InvokeRequest, invocation_out
from hydraserve.validation import NAME_PARAM

bp = Blueprint("invocations", __name__)
NAME = {"name": NAME_PARAM}
ID = {"id": {"type": "string", "maxLength": 40}}


def wants_stream() -> bool:
    return "text/event-stream" in request.headers.get("Accept", "")


def wants_async() -> bool:
    return "respond-async" in request.headers.get("Prefer", "")


def sync_deadline_s() -> float:
    raw = request.args.get("timeout_s")
    if raw is None:
        return extension().settings.sync_deadline_s
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(f"timeout_s={raw!r} is not a number", "timeout_s") from None
    if not 0 <= value <= 600:
        raise InvalidRequest(f"timeout_s={value} is out of range 0..600", "timeout_s")
    return value


def start(name: str, body: InvokeRequest, kind: str, follow: bool, stream: bool = False,
          fallback: dict | None = None):
    """Accepts an invocation; with ``follow``, subscribes to its events first (every token with
    ``stream``, else only the outcome), holding one of this process's request slots until the
    waiter closes (a 429 when the tenant is over its fair share of them)."""
    rt, who = extension(), g.principal
    if not follow:
        return _accept(rt, name, body, kind, None, fallback=fallback)
    rt.slots.acquire(who.tenant_id)
    try:
        function, inv, waiter = _accept(rt, name, body, kind, rt.listener(), stream, fallback)
    except BaseException:
        rt.slots.release(who.tenant_id)
        raise
    assert waiter is not None  # followed: there is a listener

    def answered() -> None:
        rt.slots.release(who.tenant_id)
        done = waiter.final  # the row the worker sent with its outcome, when it came
        ttft = done.ttft_s() if done is not None and not done.cold else None
        if done is not None and ttft is not None:
            rt.congestion.observe(done.function_version_id, ttft)

    waiter.on_close = answered
    return function, inv, waiter


def _accept(rt, name: str, body: InvokeRequest, kind: str, listener, stream: bool = False,
            fallback: dict | None = None):
    target = functions.get_target(db(), g.principal, name)
    servable.refuse(target.version, target.unservable_reason)  # its starts kept failing
    body = admission.with_model_defaults(target, body, rt.tokenizers, fallback)
    admission.check_input(target, body, rt.tokenizers)  # a 400 now, not after a cold start
    inv_id = invocations.new_id()
    events = listener.subscribe(inv_id) if listener else None
    try:
        inv = invocations.accept(db(), rt.publisher(), g.principal, target, body, kind, inv_id,
                                 listener.queue_name if listener else None,
                                 rt.settings.queue_prefix, stream=listener is not None and stream,
                                 cluster_max_in_flight=rt.settings.cluster_max_in_flight)
    except BaseException:
        if listener:
            listener.unsubscribe(inv_id)
        raise
    waiter = (Waiter(rt.session_factory, listener, inv_id, events)
              if listener is not None and events is not None else None)
    return (target.name, target.version), inv, waiter


@operation(bp, "/v1/functions/<name>/invocations", "POST", summary="Invoke a function",
           body=InvokeRequest, response=InvocationOut, path_params=NAME,
           query_params={"timeout_s": {"type": "number", "minimum": 0, "maximum": 600}})
def invoke(name: str, body: InvokeRequest):
    deadline = sync_deadline_s()
    if wants_async():
        function, inv, _ = start(name, body, "invoke", follow=False)
        return accepted(function, inv)
    function, inv, waiter = start(name, body, "invoke", follow=True, stream=wants_stream())
    if wants_stream():
        return sse(function, waiter, deadline_s=max(deadline, 3600))
    inv = waiter.wait(deadline)
    if not invocations.is_finished(inv):
        return accepted(function, inv)
    return finished(function, inv)


def accepted(function: tuple[str, int], inv):
    out = invocation_out(inv, *function).model_dump(mode="json")
    return out, 202, {"Location": f"/v1/invocations/{inv.id}"}


def finished(function: tuple[str, int], inv):
    out = invocation_out(inv, *function, group_of(inv)).model_dump(mode="json")
    if inv.status == "failed" and (inv.error or {}).get("type") == "invalid_request_error":
        return {"error": inv.error}, 400, {"X-Invocation-Id": inv.id}
    return out, 200, {"X-Invocation-Id": inv.id}


def sse(function: tuple[str, int], waiter: Waiter, deadline_s: float) -> Response:
    def stream() -> Iterator[str]:
        done = False
        try:
            yield f": accepted {waiter.inv_id}\n\n"
            for event in waiter.follow(deadline_s):
                if event is None:
                    yield ": keep-alive\n\n"  # a cold start is in progress
                    continue
                yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
            inv = waiter.load()
            done = invocations.is_finished(inv)
            final = invocation_out(inv, *function).model_dump(mode="json")
            yield f"event: invocation\ndata: {json.dumps(final)}\n\n"
        finally:
            waiter.close()
            if not done and not waiter.diverged:  # the client went away (or the deadline
                waiter.cancel()  # passed): stop the work; a diverged retry goes on

    return Response(stream(), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Invocation-Id": waiter.inv_id})


@operation(bp, "/v1/invocations/<id>", "GET", summary="Read an invocation",
           response=InvocationOut, path_params=ID)
def get_invocation(id: str):  # noqa: A002 (the path parameter's name)
    inv = invocations.get(db(), g.principal, id)
    return invocation_out(inv, *invocations.function_of(db(), inv),
                          group_of(inv)).model_dump(mode="json")


def group_of(inv) -> GroupOut | None:
    """Where the invocation last ran, and what became of that group's pipeline: the plan of
    stage 0 of its last attempt's group (``instance_ids`` lists that group by stage; a later
    stage may have moved to a plan of its own as a replica since)."""
    return group_out(cluster.plan_of_instance(
        db(), inv.instance_ids[0] if inv.instance_ids else None))


@operation(bp, "/v1/invocations/<id>/cancel", "POST", summary="Cancel an invocation",
           response=InvocationOut, path_params=ID)
def cancel_invocation(id: str):  # noqa: A002
    inv = invocations.get(db(), g.principal, id)
    invocations.cancel(db(), inv)
    return invocation_out(inv, *invocations.function_of(db(), inv)).model_dump(mode="json")
