"""Stage 0's request loop: consume the function version's request queue, batch continuously,
stream tokens to the API's reply queue, record results in Postgres, then ack.

A pool worker that loaded stage 0 from the node cache is handed a ``RequestLoop`` (the
platform's ``gpu_runtime.coldstart.StageServer``); a ``--loader files`` node runs
``python -m hydraserve.tasks.node.request_loop --instance-id N`` instead. A request is acked
only after its outcome is committed, so a worker that dies leaves its requests on the queue for
the next group (at-least-once; ``invocations.ledger.begin`` makes redelivery safe).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime

import pika
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from gpu_runtime.channel import ChannelError
from gpu_runtime.coldstart.handoff import ControlInbox
from gpu_runtime.consolidate import ConsolidationError, Consolidator, buffers_loader
from gpu_runtime.detokenize import INCOMPLETE, IncrementalDetokenizer, before_stop
from gpu_runtime.engine import EngineConfig, LLMEngine
from gpu_runtime.errors import RuntimeInputError
from gpu_runtime.sampling import SamplingParams
from hydraserve.broker import Publisher, connect, request_queue
from hydraserve.cluster import consolidation
from hydraserve.cluster import service as cluster
from hydraserve.cluster.models import ERROR_CHARS, MAX_BATCH
from hydraserve.db import make_engine, make_session_factory, utcnow
from hydraserve.invocations import ledger
from hydraserve.invocations.ledger import Ledger
from hydraserve.invocations.schemas import DEFAULT_MAX_TOKENS
from hydraserve.settings import Settings
from hydraserve.tasks.node import serving_metrics
from hydraserve.tasks.node.assignment import Assignment, load_assignment
from hydraserve.tasks.node.prefill_marker import PrefillMarker, marker_path

log = logging.getLogger("hydraserve.serving")
CANCEL_CHECK_S = 0.5
TOUCH_S = 2.0
# the loop's own connections (broker, database, another stage) failed: no request's doing
NOT_A_REQUESTS_DOING = (pika.exceptions.AMQPError, SQLAlchemyError, ChannelError, OSError)


@dataclass(slots=True)
class Choice:
    """One of an invocation's ``n`` choices: what it generated and what was streamed of it."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    sent_text: str = ""
    text: str = ""  # the engine's text (cut before a stop string); "" until it has one
    finish_reason: str | None = None
    top_logprobs: list[list] = field(default_factory=list)  # per token: [[id, logprob], ...]
    detok: IncrementalDetokenizer | None = None  # None: the model has no tokenizer


@dataclass(slots=True)
class Active:
    """An invocation in the engine."""

    inv_id: str
    delivery_tag: int
    reply_to: str | None
    choices: list[Choice] = field(default_factory=lambda: [Choice()])
    first_token_at: datetime | None = None
    want_logprobs: bool = False
    stream: bool = True  # token events wanted; otherwise only the final one
    stop: tuple[str, ...] = ()
    claimed_at: float = field(default_factory=time.time)

    @property
    def token_ids(self) -> list[int]:
        """Choice 0's tokens (every choice gets its first token in the same step)."""
        return self.choices[0].token_ids


def sampling_params(req: dict) -> SamplingParams:
    return SamplingParams(max_tokens=req.get("max_tokens", DEFAULT_MAX_TOKENS),
                          temperature=req.get("temperature", 0.0), top_p=req.get("top_p", 1.0),
                          top_k=req.get("top_k", 0), seed=req.get("seed"),
                          stop=tuple(req.get("stop", ())),
                          top_logprobs=req.get("top_logprobs", 0),
                          presence_penalty=req.get("presence_penalty", 0.0),
                          frequency_penalty=req.get("frequency_penalty", 0.0),
                          repetition_penalty=req.get("repetition_penalty", 1.0),
                          logit_bias=tuple((int(t), float(b))
                                           for t, b in (req.get("logit_bias") or {}).items()))


@dataclass(slots=True)
class Prepared:
    """What stage 0 needs besides its engine, opened while the stage loads (``prepare``)."""

    settings: Settings
    sessions: sessionmaker
    assignment: Assignment
    ledger: Ledger


class NoReplica(RuntimeError):
    """A later stage's group stopped before it consolidated: there is nothing to stand in for."""


def prepare(instance_id: int, replica: bool = False) -> Prepared:
    """Opens Postgres and reads the assignment; a ``replica`` first moves its instance to a
    plan of its own (``consolidation.become_replica``). (The broker connection is opened when
    serving starts: an AMQP connection left without heartbeats through a long load would be
    closed by the broker.)"""
    settings = Settings.from_env()
    engine = make_engine(settings.database_url)
    sessions = make_session_factory(engine)
    with sessions() as s:
        if replica and not consolidation.become_replica(s, instance_id):
            raise NoReplica(f"instance {instance_id}: its group did not consolidate (stopped "
                            "first); it ends")
        a = load_assignment(s, instance_id)
    kept = Ledger(engine)
    kept.run(lambda conn: None)  # open the kept connection now
    return Prepared(settings, sessions, a, kept)


@dataclass(frozen=True, slots=True)
class RequestLoop:
    """Stage 0's hand-off to the platform (implements ``gpu_runtime.coldstart.StageServer``):
    travels in the stage plan to a pool worker, prepares while the weights arrive, then
    serves the instance's request queue. With ``replica``, a later full-share stage's, which
    prepares and serves once its pipeline consolidated."""

    instance_id: int
    replica: bool = False  # a later stage standing alone after its pipeline consolidated

    def prepare(self) -> Prepared:
        return prepare(self.instance_id, self.replica)

    def serve(self, engine: LLMEngine, report: dict, prepared: Prepared,
              control: ControlInbox | None = None) -> None:
        phases = ("init_start", "init_end", "load_end", "ready")
        serve(engine, prepared, {k: report[k] for k in phases if report.get(k)}, control)


class Server:
    def __init__(self, p: Prepared, engine: LLMEngine, ready_at: datetime,
                 control: ControlInbox | None = None) -> None:
        self.settings, self.a, self.engine = p.settings, p.assignment, engine
        self.sessions = p.sessions
        self.control = control  # the node's messages (consolidation's hand-over)
        self.consolidator: Consolidator | None = None
        self.ready_at = ready_at  # requests queued before this found no instance: cold
        self.ledger = p.ledger
        self.publisher = Publisher(p.settings.broker_url, confirm=False)
        self.active: dict[str, Active] = {}
        self.inbox: list[tuple[int, str | None, dict]] = []
        # suspects of an earlier worker death, each prefilled alone (invocations/quarantine.py)
        self.held: list[tuple[int, str | None, dict]] = []
        self.isolating: str | None = None  # the suspect being prefilled now
        self.marker = PrefillMarker(marker_path(p.settings.queue_prefix, p.assignment.instance_id))
        self.fault_prompt = fault_prompt()
        self.poison: set[str] = set()  # requests that carry the fault-injection prompt
        self.stopping = False
        self._last_cancel_check = self._last_touch = time.monotonic()

    # ---- intake -----------------------------------------------------------------------------

    def on_message(self, ch, method, props, body: bytes) -> None:
        self.inbox.append((method.delivery_tag, props.reply_to, json.loads(body)))

    def _admit(self, ch) -> None:
        """Claims everything that arrived in one transaction, then feeds the engine; suspects
        of a worker death wait to be prefilled alone (``_isolate``)."""
        inbox, self.inbox = self.inbox, []
        claimed = self.ledger.run(ledger.begin, [msg["id"] for _, _, msg in inbox],
                                  self.a.group, self.ready_at)
        for tag, reply_to, msg in inbox:
            inv_id = msg["id"]
            if inv_id not in claimed:  # finished already (redelivery) or out of attempts
                ch.basic_ack(tag)
                self._event(reply_to, inv_id, {"type": "done"})
            elif claimed[inv_id]:
                self.held.append((tag, reply_to, msg))
            else:
                self._start(ch, tag, reply_to, msg)

    def _isolate(self, ch) -> bool:
        """Starts a held suspect once nothing else is prefilling; True while one is being
        prefilled (new requests wait meanwhile, so that it is prefilled alone)."""
        if self.isolating is not None:
            active = self.active.get(self.isolating)
            if active is not None and not active.token_ids:
                return True
            self.isolating = None
        if self.held and not self._prefilling():
            tag, reply_to, msg = self.held.pop(0)
            if self._start(ch, tag, reply_to, msg):
                self.isolating = msg["id"]
                return True
        return False

    def _prefilling(self) -> tuple[str, ...]:
        """The requests in the engine without a first token yet."""
        return tuple(i for i, a in self.active.items() if not a.token_ids)

    def _start(self, ch, tag: int, reply_to: str | None, msg: dict) -> bool:
        """Feeds one claimed request to the engine; False if its input failed (recorded)."""
        inv_id, req = msg["id"], msg["request"]
        n = req.get("n", 1)
        active = Active(inv_id, tag, reply_to, [Choice() for _ in range(n)],
                        want_logprobs=bool(req.get("logprobs")),
                        stream=msg.get("stream", True), stop=tuple(req.get("stop", ())))
        try:
            prompt_ids = self._prompt_ids(req)
            tok = self.engine.tokenizer
            for c in active.choices:  # each choice's text, decoded after the prompt's
                c.detok = IncrementalDetokenizer(tok, prompt_ids) if tok is not None else None
            self.engine.add_request(inv_id, prompt_ids, sampling_params(req), n=n,
                                    response_format=req.get("response_format"))
        except RuntimeInputError as exc:
            self._finish_failed(ch, active, "invalid_request_error", exc.message, exc.param)
            return False
        except Exception as exc:  # noqa: BLE001 - this input broke the tokenizer or engine: it fails alone
            # the type only: the message may quote the prompt, which is never logged
            log.warning("invocation %s: its input failed in the worker (%s)", inv_id,
                        type(exc).__name__)
            self._finish_failed(ch, active, "invalid_request_error",
                                f"the model could not take this input: {describe(exc)}", None)
            return False
        self.active[inv_id] = active
        if self.fault_prompt and prompt_ids == self.fault_prompt:
            self.poison.add(inv_id)
        return True

    def _prompt_ids(self, req: dict) -> list[int]:
        tok = self.engine.tokenizer
        if "prompt_ids" in req:
            return list(req["prompt_ids"])
        if tok is None:
            raise RuntimeInputError("this model has no tokenizer.json; send prompt_ids", "prompt")
        if "messages" in req:
            return tok.encode_chat(req["messages"])
        return tok.encode(req["prompt"])

    # ---- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        conn = connect(self.settings.broker_url)
        ch = conn.channel()
        queue = request_queue(self.a.function_id, self.a.version, self.settings.queue_prefix)
        ch.queue_declare(queue, durable=True)
        ch.basic_qos(prefetch_count=MAX_BATCH)
        tag = ch.basic_consume(queue, self.on_message)
        while True:
            busy = self.engine.has_unfinished()
            conn.process_data_events(time_limit=0 if busy else 0.2)
            if not self._isolate(ch) and self.inbox:
                self._admit(ch)
                self._isolate(ch)  # a suspect just claimed starts now if nothing else prefills
            if self.consolidator is not None:
                self._consolidation_step()  # a step boundary: the switch happens here
            if self.engine.has_unfinished():
                prefilling = self._prefilling()
                self.marker.mark(prefilling)  # read by the node agent if this dies
                if self.poison.intersection(prefilling):
                    os.abort()  # fault injection: a crash in the middle of a prefill
                self._step(ch)
            self._housekeeping(ch)
            if self.stopping and tag:
                ch.basic_cancel(tag)  # take no more; unacked prefetched messages go back
                tag = None
            if self.stopping and not self.active:  # held suspects go back unacked
                break
        self.marker.clear()
        conn.close()
        self.ledger.close()

    def _step(self, ch) -> None:
        finished = []
        for out in self.engine.step():
            active = self.active.get(out.request_id)
            if active is None:
                continue
            try:
                self._take(active, out)
            except Exception as exc:  # noqa: BLE001 - decoding one request's output: it fails alone
                self._fail_running(ch, active, out, exc)
                continue
            if out.request_finished:
                finished.append((active, out))
        if finished:
            self._finish_ok(ch, finished)
        blocks = self.engine.blocks  # the state after the step, which stays until the next
        serving_metrics.step(self.a.function_name, len(self.active),
                             len(self.held) + len(self.inbox),
                             1 - blocks.num_free_blocks / max(blocks.num_blocks, 1))

    def _take(self, active: Active, out) -> None:
        if out.new_token_ids and active.first_token_at is None:
            active.first_token_at = utcnow()
        choice = active.choices[out.index]
        choice.token_ids += out.new_token_ids
        choice.logprobs += out.new_logprobs
        choice.top_logprobs += out.new_top_logprobs
        if choice.detok is not None:
            choice.detok.add(out.new_token_ids)
            if out.finished:
                choice.detok.finish()
        choice.text, choice.finish_reason = out.text, out.finish_reason
        self._stream(active, choice, out)

    def _fail_running(self, ch, active: Active, out, exc: Exception) -> None:
        log.warning("invocation %s: its output could not be processed (%s)", active.inv_id,
                    type(exc).__name__)
        if not out.request_finished:
            self.engine.abort(active.inv_id)
        self._finish_failed(ch, active, "internal_error",
                            f"the output of this request could not be decoded: {describe(exc)}",
                            None)

    def _stream(self, active: Active, choice: Choice, out) -> None:
        if not active.reply_to or not active.stream or not out.new_token_ids:
            return
        text = self._text(choice, active.stop)
        if not out.finished:  # hold back a split UTF-8 sequence and a possible stop string
            text = text.rstrip(INCOMPLETE)
            text = text[:len(text) - held_back(text, active.stop)]
        sent = choice.sent_text
        if len(text) < len(sent):
            text = sent  # what was held back can only grow the text, never take it back
        delta, choice.sent_text = text[len(sent):], text
        # where this event starts in its choice, so that a client fed by a retry skips what it
        # has seen
        index = len(choice.token_ids) - len(out.new_token_ids)
        self._event(active.reply_to, active.inv_id, {
            "type": "token", "choice": out.index, "token_ids": out.new_token_ids,
            "text": delta, "index": index, "text_offset": len(sent),
            **(self._logprob_fields(choice, out) if active.want_logprobs else {})})

    @staticmethod
    def _logprob_fields(choice: Choice, out) -> dict:
        """Per new token: its logprob, the top ones asked for, and where its text starts."""
        new = len(out.new_token_ids)
        offsets = choice.detok.offsets[-new:] if choice.detok is not None else [0] * new
        return {"logprobs": out.new_logprobs, "top_logprobs": out.new_top_logprobs,
                "text_offsets": offsets}

    def _text(self, choice: Choice, stop: tuple[str, ...]) -> str:
        if choice.detok is not None:  # incremental, with the prompt's context: see detokenize
            return before_stop(choice.detok.text, stop)
        if choice.text:
            return choice.text
        tok = self.engine.tokenizer
        return tok.decode(choice.token_ids) if tok is not None else ""

    def _finish_ok(self, ch, finished: list) -> None:
        """Records a step's finished requests in one transaction, then acks and tells the API."""
        outcomes, done = [], []
        for active, out in finished:
            try:
                choices = [self._choice_output(active, i) for i in range(len(active.choices))]
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                self._fail_running(ch, active, out, exc)
                continue
            done.append((active, out))
            # choice 0 at the top level, as before ``n``; every choice under "choices"
            output = {k: v for k, v in choices[0].items() if k != "index"} | {"choices": choices}
            tokens_out = sum(len(c.token_ids) for c in active.choices)
            outcomes.append(ledger.Outcome(active.inv_id, output, out.num_prompt_tokens,
                                            tokens_out, active.first_token_at))
        recorded = self.ledger.run(ledger.complete, outcomes)
        for (active, _out), outcome in zip(done, outcomes, strict=True):
            ch.basic_ack(active.delivery_tag)
            self.active.pop(active.inv_id, None)
            row = recorded.get(active.inv_id)  # None: cancelled meanwhile; the API reads the row
            if row:
                serving_metrics.finished(self.a.function_name, row, active.claimed_at)
            self._event(active.reply_to, active.inv_id, {
                "type": "done", **outcome.output,
                **({"invocation": jsonable(row)} if row else {})})

    def _choice_output(self, active: Active, index: int) -> dict:
        choice = active.choices[index]
        out = {"index": index, "text": self._text(choice, active.stop),
               "token_ids": choice.token_ids,
               "finish_reason": choice.finish_reason}
        if active.want_logprobs:
            out["logprobs"] = choice.logprobs
            out["top_logprobs"] = choice.top_logprobs
            out["text_offsets"] = (choice.detok.offsets if choice.detok is not None
                                   else [0] * len(choice.token_ids))
        return out

    def _finish_failed(self, ch, active: Active, kind: str, message: str, param: str | None) -> None:
        self.ledger.run(ledger.fail, active.inv_id, kind, message, param)
        ch.basic_ack(active.delivery_tag)
        self.active.pop(active.inv_id, None)
        self._event(active.reply_to, active.inv_id,
                    {"type": "error", "error": {"type": kind, "message": message, "param": param}})

    # ---- consolidation (docs/consolidation.md) ----------------------------------------------

    def _take_control(self) -> None:
        """Starts consolidating when the node hands over the rest of the model."""
        for kind, body in self.control.poll() if self.control is not None else ():
            if kind != "consolidate" or self.consolidator is not None:
                log.warning("instance %s: ignored control message %r", self.a.instance_id, kind)
                continue
            try:
                self.consolidator = Consolidator(self.engine, body["spec"],
                                                 buffers_loader(body["sources"]))
            except ConsolidationError as exc:
                with self.sessions() as s:
                    consolidation.give_up(s, self.a.plan_id, exc.message)
                continue
            log.info("instance %s: consolidating pp=%d -> 1", self.a.instance_id, self.a.pp)

    def _consolidation_step(self) -> None:
        """Between steps: switches to the whole model when the consolidator is ready, then
        releases the other stages (recorded first, so their exit is a release); a failed load
        leaves the pipeline serving, with the cause recorded."""
        c = self.consolidator
        assert c is not None
        if c.failed or not c.tick():
            if c.failed:
                self.consolidator = None
                with self.sessions() as s:
                    consolidation.give_up(s, self.a.plan_id, f"loading the rest of the model "
                                          f"failed: {c.stats.error}", c.stats.to_dict())
            return
        self.consolidator = None
        with self.sessions() as s:
            released = consolidation.switched(s, self.a.group, c.stats.to_dict())
        c.release()
        log.info("instance %s consolidated (moved %d blocks at the switch, %.1f ms); released "
                 "%s", self.a.instance_id, c.stats.switch_blocks, c.stats.switch_s * 1000,
                 released)

    def _housekeeping(self, ch) -> None:
        now = time.monotonic()
        if self.control is not None:
            self._take_control()
        if now - self._last_cancel_check >= CANCEL_CHECK_S and self.active:
            self._last_cancel_check = now
            gone = self.ledger.run(ledger.cancelled, list(self.active))
            for inv_id in gone:
                self.engine.abort(inv_id)
                active = self.active.pop(inv_id)
                ch.basic_ack(active.delivery_tag)  # the row says cancelled: nothing to redo
                self._event(active.reply_to, inv_id, {"type": "done", "cancelled": True})
        if now - self._last_touch >= TOUCH_S and self.active:
            self._last_touch = now
            self.ledger.run(ledger.touch, self.a.group)

    def _event(self, reply_to: str | None, inv_id: str, event: dict) -> None:
        if reply_to:
            try:
                self.publisher.publish(reply_to, event, correlation_id=inv_id, durable=False)
            except pika.exceptions.AMQPError:
                log.warning("could not send %s event of %s", event["type"], inv_id)


def fault_prompt() -> list[int] | None:
    """Fault injection for tests (off unless set): with ``HYDRA_FAULT_ABORT_PROMPT`` set to
    comma-separated token ids, a request with exactly that ``prompt_ids`` makes the worker abort
    while prefilling it, as a crash in native code would."""
    value = os.environ.get("HYDRA_FAULT_ABORT_PROMPT", "")
    return [int(t) for t in value.split(",")] if value else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop string: they are
    not streamed until the next tokens tell (a stop string is never partly streamed)."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                if text.endswith(s[:k])), default=0)


def describe(exc: BaseException, limit: int = 300) -> str:
    """``Type: message``, the message cut to ``limit`` characters (it may quote the input)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def record_crash(p: Prepared, exc: BaseException) -> None:
    """Writes why stage 0's loop died into its instance row, with where it broke (the last
    frames of the traceback; the worker's log has all of it), so a crash leaves its cause."""
    log.error("instance %s: the request loop died", p.assignment.instance_id, exc_info=exc)
    head = f"request loop died: {describe(exc)}"
    frames = "".join(traceback.format_tb(exc.__traceback__, limit=-3))  # the last frames
    error = f"{head}\n{frames[-(ERROR_CHARS - len(head) - 1):]}"
    try:
        with p.sessions() as s:
            cluster.fail_instance(s, p.assignment.instance_id, error)
    except SQLAlchemyError:  # the database may be what broke: the log keeps the cause
        log.exception("instance %s: could not record the crash", p.assignment.instance_id)


def jsonable(row: dict) -> dict:
    """An invocation row for the ``done`` event: timestamps as ISO 8601 strings."""
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


def serve(engine: LLMEngine, p: Prepared, timeline: dict,
          control: ControlInbox | None = None) -> None:
    """Marks the group ready with this stage's timeline and serves until SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    with p.sessions() as s:
        ready_at = cluster.mark_ready(s, p.assignment.group, timeline)
    server = Server(p, engine, ready_at, control)
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "stopping", True))
    a = p.assignment
    log.info("instance %s serving function %s (pp=%s)", a.instance_id, a.function_id, a.pp)
    try:
        server.run()
    except Exception as exc:
        if isinstance(exc, NOT_A_REQUESTS_DOING):
            server.marker.clear()  # the requests being prefilled are not suspects of this
        record_crash(p, exc)
        raise


def main(argv: list[str] | None = None) -> None:
    """A fresh process that loads stage 0 from the model's files (``--loader files`` nodes)."""
    ap = argparse.ArgumentParser(description="Serve stage 0 of a pipeline group.")
    ap.add_argument("--instance-id", type=int, required=True)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    timeline = {"init_start": time.time()}
    p = prepare(args.instance_id)
    a = p.assignment
    engine = LLMEngine(EngineConfig(
        # a sequential-policy start hands over the fresh copy its node agent downloaded
        model=os.environ.get("HYDRA_MODEL_DIR") or a.model_dir(), pp=a.pp,
        num_threads=args.threads, kv_cache_bytes=a.kv_cache_bytes,
        stage_addresses=a.addresses if a.pp > 1 else None))
    timeline["load_end"] = timeline["ready"] = time.time()
    try:
        serve(engine, p, timeline)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
