"""The scheduler process: one leader (Postgres advisory lock), woken by NOTIFY or a tick.

Each tick applies, in order: dead nodes out; requests queued past ``HYDRA_MAX_QUEUE_S``
failed; broken or stuck groups stopped; requests of dead groups back to ``queued``; idle groups
past keep-alive stopped (down to ``min_instances``); pipelines that became ready start to
consolidate (docs/consolidation.md); new groups planned for queued demand or
``min_instances``. A cold start that cannot be placed stays queued and is planned again on the
next tick, until ``HYDRA_MAX_QUEUE_S``.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import psycopg
from kombu.exceptions import KombuError
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from hydraserve.cluster import consolidation as consolidations
from hydraserve.cluster import presence
from hydraserve.cluster import service as cluster
from hydraserve.cluster.models import MAX_BATCH, Instance, Plan
from hydraserve.db import EVENTS_CHANNEL, make_engine, make_session_factory, must_get, utcnow
from hydraserve.functions import servable
from hydraserve.functions.models import Function, FunctionVersion
from hydraserve.invocations import service as invocations
from hydraserve.scheduler import actions, policies, profiles
from hydraserve.scheduler.actions import Profile, Sender
from hydraserve.scheduler.planner import PlannerConfig
from hydraserve.settings import Settings

log = logging.getLogger("hydraserve.scheduler")
LOCK_KEY = 0x48594452  # "HYDR"
MIN_GAP_S = 0.05
# Under a stream of requests, scale-out looks run at most this often: every request notifies,
# and a warm one needs nothing from the scheduler. After a quiet spell the first request of a
# burst is still looked at within MIN_GAP_S (a cold start is not delayed).
REACT_EVERY_S = 0.25
# A dead node agent is noticed by its presence session ending (cluster/presence.py): a node
# whose lock this leader has seen free for PRESENCE_GRACE_S, and that has not heartbeaten for
# as long, is taken out, its instances failed and their requests planned elsewhere. The grace
# covers a Postgres restart (every session ends; agents take their locks again within a
# second), and is counted from this leader's own looks, so a new leader or one that lost the
# database waits it out again.
PRESENCE_GRACE_S = 2.0
# The backstop, for an agent that lives (its lock held) but no longer works: node agents
# heartbeat every 2 s (tasks/node/agent.py HEARTBEAT_S), and a node silent for this long is
# taken out. (5 s took healthy nodes out here: on a busy 2-core machine a heartbeat can be late
# by seconds, so heartbeats alone cannot tell a dead node within a few seconds.)
HEARTBEAT_TIMEOUT_S = 10.0
# A version whose cold starts fail on their nodes (a checkpoint that does not load, bytes that
# fail their checksums) is not re-planned every pass: after the n-th failure in a row (since
# it was last ready) the next start waits START_BACKOFF_S * 2**(n-1); at MAX_FAILED_STARTS the
# version is marked unservable, with the last failure's cause, and its queued invocations fail
# with it, until a new version or an admin clears it (functions/service.py).
MAX_FAILED_STARTS, START_BACKOFF_S = 3, 1.0


def wait_events(conn: psycopg.Connection, timeout_s: float, gap_s: float = MIN_GAP_S) -> list[str]:
    """Payloads of the NOTIFYs that arrive within ``timeout_s`` (none: the time is up). A burst is
    coalesced: after the first, ``gap_s`` more are gathered, so one pass serves them all."""
    first = [n.payload for n in conn.notifies(timeout=timeout_s, stop_after=1)]
    if not first:
        return []
    time.sleep(gap_s)
    return first + [n.payload for n in conn.notifies(timeout=0)]


class Scheduler:
    def __init__(self, settings: Settings, cfg: PlannerConfig | None = None,
                 profile: Profile | None = None, sender: Sender | None = None,
                 tick_s: float = 0.5, heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
                 start_timeout_s: float = 600.0,
                 sessions: sessionmaker | None = None,
                 presence_grace_s: float = PRESENCE_GRACE_S) -> None:
        self.settings = settings
        self.policy = settings.scheduler_policy  # scheduler/policies.py
        self.cfg = policies.planner_config(self.policy, cfg or PlannerConfig())
        self.profile = profile or Profile()
        if sender is None:
            from hydraserve.tasks.celery_app import celery_app

            sender = Sender(celery_app, settings.queue_prefix)
        self.sender = sender
        self.sessions = sessions or make_session_factory(make_engine(settings.database_url))
        self.tick_s, self.heartbeat_timeout_s = tick_s, heartbeat_timeout_s
        self.start_timeout_s = start_timeout_s
        self.presence_grace_s = presence_grace_s
        self._absent_since: dict[str, float] = {}  # node id -> when this leader saw it absent
        self._profiled_at = 0.0  # monotonic time of the last profiles.refresh

    def run(self) -> None:
        """Leads (or waits to lead) until killed; a lost database connection is reopened."""
        while True:
            try:
                self._lead()
            except psycopg.OperationalError as exc:
                log.warning("lost the database (%s); reconnecting", exc)
                time.sleep(1.0)

    def _lead(self) -> None:
        url = make_url(self.settings.database_url).set(drivername="postgresql")
        with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True) as conn:
            while not conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()[0]:  # type: ignore[index]
                time.sleep(1.0)  # a standby: the leader holds the lock until its session ends
            log.info("scheduler is the leader")
            self._absent_since.clear()  # presence is judged from this leader's own looks
            conn.execute(f"LISTEN {EVENTS_CHANNEL}")
            while True:
                self.tick()
                due = time.monotonic() + self.tick_s
                last_react = 0.0
                while (left := due - time.monotonic()) > 0:
                    gap = max(MIN_GAP_S, last_react + REACT_EVERY_S - time.monotonic())
                    events = wait_events(conn, left, gap)
                    queued = {int(e.partition(":")[2]) for e in events if e.startswith("queued:")}
                    if not events or len(queued) < len(events):
                        break  # the tick is due, or a node or group changed: a full pass
                    self.react(queued)
                    last_react = time.monotonic()

    def tick(self) -> None:
        """One full pass; a broker or database outage skips it (state is in Postgres, the next
        tick redoes what is still needed)."""
        self._pass(self.full_pass)

    def full_pass(self, s: Session) -> None:
        """Every decision, in order, on one session (``tick`` runs it on a fresh one)."""
        self.take_out_dead_nodes(s)
        invocations.expire_queued(s, self.settings.max_queue_s)
        self.stop_broken_groups(s)
        if ended := consolidations.end_orphans(s):
            log.warning("plans %s ended before their switch: consolidation failed", ended)
            s.commit()
        invocations.requeue_orphans(s)
        self.scale_in(s)
        self.consolidate(s)
        if time.monotonic() - self._profiled_at >= profiles.REFRESH_EVERY_S:
            profiles.refresh(s)  # the planner's measured inputs
            self._profiled_at = time.monotonic()
        self.scale_out(s)

    def react(self, function_ids: set[int]) -> None:
        """New requests of these functions: only scale-out, only for them. Every invocation
        notifies, so this is what a warm request costs the scheduler (a few indexed reads)."""
        self._pass(lambda s: self.scale_out(s, function_ids))

    def _pass(self, steps) -> None:
        try:
            with self.sessions() as s:
                steps(s)
        except (SQLAlchemyError, KombuError, OSError) as exc:
            self._absent_since.clear()  # what was seen before the outage proves nothing now
            log.warning("scheduler pass skipped: %s: %s", type(exc).__name__, exc)

    def take_out_dead_nodes(self, s: Session) -> list[str]:
        """Nodes whose agent is gone (presence lock free for the grace, no heartbeat for as
        long) or silent (no heartbeat for ``heartbeat_timeout_s``) go down; returns them."""
        down = actions.mark_silent_nodes_down(s, self.heartbeat_timeout_s)
        now = time.monotonic()
        absent = presence.absent_nodes(s)
        self._absent_since = {n: self._absent_since.get(n, now) for n in absent}
        gone = [n for n, since in self._absent_since.items()
                if now - since >= self.presence_grace_s and absent[n] >= self.presence_grace_s]
        actions.take_out_absent_nodes(s, gone)
        return down + gone

    def stop_broken_groups(self, s: Session) -> None:
        stuck_before = utcnow() - timedelta(seconds=self.start_timeout_s)
        for group in cluster.live_groups(s).values():
            live = [i for i in group if i.status != "stopping"]
            if not live:  # signalled already; each stage closes when its process exits
                continue
            if group[0].stage_index != 0:  # stage 0 has ended: the rest of the ring follows it
                actions.stop_group(s, self.sender, group, kill=True)
                continue
            stuck = [i for i in live if i.status == "starting" and i.created_at < stuck_before]
            for inst in stuck:
                cluster.close_instance(s, inst.id, "failed", f"not ready after {self.start_timeout_s:.0f} s")
            if stuck or len(group) < group[0].num_stages:
                log.warning("plan %s is broken (%d of %d stages live): stopping it",
                            group[0].plan_id, len(group), group[0].num_stages)
                actions.broke_while_consolidating(s, group[0].plan_id, len(group),
                                                  group[0].num_stages)
                actions.stop_group(s, self.sender, [i for i in group if i not in stuck], kill=True)

    def scale_in(self, s: Session) -> None:
        now = utcnow()
        by_version: dict[int, list[list[Instance]]] = {}
        for group in cluster.live_groups(s).values():
            by_version.setdefault(group[0].function_version_id, []).append(group)
        for fv_id, groups in by_version.items():
            fv = must_get(s, FunctionVersion, fv_id)
            ready = [g for g in groups if all(i.status == "ready" for i in g)]
            idle = [g for g in ready if g[0].last_active_at is not None and
                    now - g[0].last_active_at > timedelta(seconds=fv.keep_alive_s)]
            keep = self.min_instances(s, fv)
            # a group already stopping is on its way out: it does not count toward the keep
            active = [g for g in groups if all(i.status != "stopping" for i in g)]
            for group in idle[: max(len(active) - keep, 0)]:
                log.info("plan %s idle for over %d s: scaling in", group[0].plan_id,
                         fv.keep_alive_s)
                actions.stop_group(s, self.sender, group, kill=False)

    def consolidate(self, s: Session) -> None:
        """Pipeline groups that have just become ready start consolidating, or record why
        they stay pipelines (actions.consolidate)."""
        for group in cluster.live_groups(s).values():
            head = group[0]
            if head.stage_index != 0 or head.num_stages < 2 or head.plan_id is None:
                continue
            if len(group) < head.num_stages or any(i.status != "ready" for i in group):
                continue
            plan = must_get(s, Plan, head.plan_id)
            if plan.consolidation_state is None:
                actions.consolidate(s, self.sender, head, plan)

    def min_instances(self, s: Session, fv: FunctionVersion) -> int:
        fn = must_get(s, Function, fv.function_id)
        live_alias = fn.deleted_at is None and fn.alias_version == fv.version
        return fv.min_instances if live_alias else 0

    def scale_out(self, s: Session, function_ids: set[int] | None = None) -> None:
        """Plans groups for queued demand (of ``function_ids`` only, when given) and, on a full
        pass, for ``min_instances``."""
        wants: dict[int, invocations.Demand | None] = {
            d.function_version_id: d for d in invocations.queued_demand(s, function_ids)}
        for version_id in self.prewarm_versions(s) if function_ids is None else ():
            wants.setdefault(version_id, None)
        for fv_id, d in wants.items():
            fv = must_get(s, FunctionVersion, fv_id)
            groups = [g for g in cluster.live_groups(s, fv_id).values()
                      if all(i.status != "stopping" for i in g)]
            starting = any(any(i.status == "starting" for i in g) for g in groups)
            queued = d.queued if d else 0
            need = (not groups and queued > 0) or len(groups) < self.min_instances(s, fv) or (
                not starting and queued > MAX_BATCH * len(groups))
            if not need or len(groups) >= fv.max_instances:
                continue
            if not self.may_start(s, fv):
                continue
            waited = (utcnow() - d.oldest_queued_at).total_seconds() if d else 0.0
            plan = actions.plan_for(s, fv, queued, waited, self.cfg, self.profile)
            if plan is None:
                log.info("function version %s: no node fits now; %d request(s) wait", fv_id, queued)
                continue
            actions.launch(s, self.sender, fv, plan, self.policy, self.settings.consolidation)

    def may_start(self, s: Session, fv: FunctionVersion) -> bool:
        """False while the version backs off from failed starts, or once it is unservable
        (marking it so, and failing its queued invocations with the cause, when the failures
        reach MAX_FAILED_STARTS)."""
        if fv.unservable_reason is None:
            failed = cluster.start_failures(s, fv)
            if failed.count >= MAX_FAILED_STARTS:
                servable.mark_unservable(s, fv, f"{failed.count} cold starts in a row failed; "
                                                 f"the last: {failed.last_error}")
                log.warning("function version %s is unservable: %s", fv.id, fv.unservable_reason)
            elif failed.last_at is not None:
                wait_s = START_BACKOFF_S * 2 ** (failed.count - 1)
                return (utcnow() - failed.last_at).total_seconds() >= wait_s
        if fv.unservable_reason is not None:
            invocations.fail_queued(s, fv.id, servable.unservable_error(fv))
            return False
        return True

    def prewarm_versions(self, s: Session) -> list[int]:
        rows = s.execute(select(FunctionVersion.id).join(
            Function, (Function.id == FunctionVersion.function_id)
            & (Function.alias_version == FunctionVersion.version))
            .where(Function.deleted_at.is_(None), FunctionVersion.min_instances > 0))
        return [r[0] for r in rows]

