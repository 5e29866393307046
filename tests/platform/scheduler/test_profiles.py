"""The planner's measured inputs (scheduler/profiles.py) against real Postgres: served
requests and cold-start timelines written with chosen times, one refresh, and what the
planner then predicts with them."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select

from hydraserve.cluster import service as cluster
from hydraserve.cluster.models import Device, ModelProfile, PlannerMeasurement
from hydraserve.cluster.service import StageRecord
from hydraserve.db import utcnow
from hydraserve.functions.models import Function
from hydraserve.invocations.models import Invocation
from hydraserve.scheduler import actions, profiles, state
from hydraserve.scheduler.planner import PlannerConfig, inflation
from tests.platform.scheduler.test_decisions import add_nodes


def start_group(s, fv, pp: int, n_full: int, timeline: dict) -> list[int]:
    """A ready group of ``pp`` stages on nodes n0.. with ``n_full`` full shares."""
    stages = []
    for i in range(pp):
        device = s.scalars(select(Device).where(Device.node_id == f"n{i}")).one()
        stages.append(StageRecord(i, f"n{i}", device.id, 1 << 20, i < n_full, 1 << 20, 5.0))
    group = [inst.id for inst in cluster.record_group(s, fv, pp, stages, "test", 1.0, 0.01)]
    for inst_id in group:
        cluster.add_timeline(s, inst_id, timeline)
    cluster.mark_ready(s, tuple(group), {})
    return group


def served(s, fv, group: list[int], tpot_s: float, ttft_s: float, tokens_in: int = 10,
           tokens_out: int = 11, cold: bool = False) -> None:
    fn = s.get(Function, fv.function_id)
    finished = utcnow()  # recorded as it finishes, as the worker does
    first = finished - timedelta(seconds=tpot_s * (tokens_out - 1))
    s.add(Invocation(id=f"inv_{uuid.uuid4().hex}", tenant_id=fn.tenant_id, function_id=fn.id,
                     function_version_id=fv.id, status="succeeded", request={"kind": "invoke"},
                     instance_ids=group, queued_at=first - timedelta(seconds=ttft_s),
                     first_token_at=first, finished_at=finished,
                     tokens_in=tokens_in, tokens_out=tokens_out, cold=cold, attempts=1))
    s.commit()


TIMELINE = {"plan": 100.0, "fetch_start": 100.1, "fetch_end": 100.6, "ready": 101.0}


def test_served_requests_and_timelines_become_the_planners_inputs(s, function):
    add_nodes(s, "n0", "n1")
    fv = function()
    solo = start_group(s, fv, 1, 1, TIMELINE)  # exposed start: 1.0 s - 0.5 s of fetch = 0.5 s
    for tpot in (0.020, 0.030, 0.025):
        served(s, fv, solo, tpot, ttft_s=0.050)
    served(s, fv, solo, 0.5, ttft_s=3.0, cold=True)  # a cold one: its TTFT is not a prefill
    assert profiles.refresh(s) == 4 + 1  # four requests, one stage that became ready

    p = s.get(ModelProfile, (fv.model_id, "cpu"))
    assert p.tpot_s == pytest.approx(0.0275)  # the median of the four TPOTs
    assert p.prefill_s == pytest.approx(0.050) and p.prefill_s_per_token == pytest.approx(0.005)
    assert s.get(PlannerMeasurement, "init_overhead_s").value == pytest.approx(0.5)

    pipe = start_group(s, fv, 2, 1, TIMELINE)
    served(s, fv, pipe, 0.0275 * inflation(2, 1) + 0.004, ttft_s=0.08)  # 4 ms a hop
    assert profiles.refresh(s) == 1 + 2
    assert s.get(PlannerMeasurement, "hop_s").value == pytest.approx(0.004)
    assert profiles.refresh(s) == 0  # nothing new since the watermarks

    speed = profiles.model_speed(s, fv.model_id, 1.0, 1.0)
    assert speed.measured and speed.tpot_s == pytest.approx(0.0275)
    cfg = profiles.planner_config(s, PlannerConfig())
    assert (cfg.init_overhead_s, cfg.hop_s) == (pytest.approx(0.5), pytest.approx(0.004))
    plan = actions.plan_for(s, fv, 1, 0.0, PlannerConfig(), actions.Profile())
    assert plan is not None and plan.pp == 1
    assert plan.predicted_tpot_s == pytest.approx(0.0275)  # measured, not the 5 GB/s guess


def test_a_new_refresh_blends_with_what_was_known(s, function):
    add_nodes(s, "n0")
    fv = function()
    group = start_group(s, fv, 1, 1, TIMELINE)
    served(s, fv, group, 0.010, ttft_s=0.05)
    profiles.refresh(s)
    served(s, fv, group, 0.030, ttft_s=0.05)
    profiles.refresh(s)
    p = s.get(ModelProfile, (fv.model_id, "cpu"))
    assert p.tpot_s == pytest.approx(0.020) and p.samples == 4  # ALPHA = 0.5


def test_an_unmeasured_model_plans_with_the_first_guesses(s, function):
    add_nodes(s, "n0")
    fv = function()
    guess = actions.Profile()
    speed = profiles.model_speed(s, fv.model_id, guess.tpot_s(100), guess.prefill_s(100))
    assert not speed.measured and speed.tpot_s == guess.tpot_s(100)
    assert profiles.planner_config(s, PlannerConfig()) == PlannerConfig()


def test_a_links_measured_rate_is_what_the_planner_sees_under_its_cap(s):
    add_nodes(s, "n0")
    cluster.heartbeat(s, "n0", {"link_mb_per_s": 3.0, "link_bandwidth_mb_per_s": 40.0})
    s.commit()
    (node,) = state.nodes_snapshot(s)
    assert node.link.bytes_per_s == pytest.approx(40e6)  # uncapped: measured, not 10 Gb/s
    s.execute(cluster.update(cluster.Node).where(cluster.Node.id == "n0").values(link_mbps=80))
    s.commit()
    (node,) = state.nodes_snapshot(s)
    assert node.link.bytes_per_s == pytest.approx(10e6)  # never above the 80 Mb/s cap
