"""What stage 0 reports to its node's /metrics (hydraserve/metrics.py): per finished request,
its latencies and tokens with vLLM's names, and the phases of a cold one; per step, the
requests running and waiting and the KV cache in use."""

from __future__ import annotations

import functools
import logging

from hydraserve import metrics as m
from hydraserve.invocations.models import Invocation
from hydraserve.invocations.schemas import timings

log = logging.getLogger(__name__)


def never_raises(fn):
    """Metrics must not take a serving worker down: a failure is logged, serving goes on."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:  # noqa: BLE001 - see the docstring
            log.exception("could not record %s metrics", fn.__name__)
    return wrapper


@never_raises
def finished(model_name: str, row: dict, claimed_at: float) -> None:
    """Observes one recorded invocation (the row ``ledger.complete`` returned)."""
    inv = Invocation(**row)
    labels = (model_name, "true" if inv.cold else "false")
    queued = inv.queued_at.timestamp()
    m.QUEUE_TIME.labels(*labels).observe(max(claimed_at - queued, 0.0))
    if (ttft := inv.ttft_s()) is not None:
        m.TTFT.labels(*labels).observe(ttft)
    if inv.finished_at is not None:
        m.E2E.labels(*labels).observe((inv.finished_at - inv.queued_at).total_seconds())
    if (tpot := inv.tpot_s()) is not None:
        m.ITL.labels(*labels).observe(tpot)
    m.PROMPT_TOKENS.labels(model_name).inc(inv.tokens_in or 0)
    m.GENERATION_TOKENS.labels(model_name).inc(inv.tokens_out or 0)
    if inv.cold:
        for phase, ms in timings(inv).breakdown_ms.items():
            # the API's breakdown names the last phase by its end: loaded to first token
            label = "prefill" if phase == "first_token" else phase
            m.COLD_START_PHASE.labels(model_name, label).observe(ms / 1000)


@never_raises
def step(model_name: str, running: int, waiting: int, kv_used: float) -> None:
    m.RUNNING.labels(model_name).set(running)
    m.WAITING.labels(model_name).set(waiting)
    m.KV_USAGE.labels(model_name).set(kv_used)
