"""What the console's live groups say a group is (console/service.py pipeline_text)."""

from __future__ import annotations

from hydraserve.cluster.models import Plan
from hydraserve.console.service import pipeline_text


def plan(**kw) -> Plan:
    return Plan(**({"pp": 2, "reason": "pp=2 with 1 full share(s) meets both SLOs",
                    "consolidation_state": None, "consolidation_target": None} | kw))


def test_each_kind_of_group_reads_as_what_it_is():
    assert pipeline_text(plan(pp=1)) == "standalone"
    assert pipeline_text(plan(pp=1, reason="replica of plan 7: its stage 1 held a full share "
                                           "and stands alone")) == "replica of plan 7"
    assert pipeline_text(plan(consolidation_target=1)) == "pp 2, will consolidate once ready"
    assert pipeline_text(plan()) == "pp 2"
    assert pipeline_text(plan(consolidation_state="consolidating")) == "pp 2, consolidating"
    assert pipeline_text(plan(consolidation_state="consolidated")) == \
        "pp 2, consolidated into a standalone replica"
    assert pipeline_text(plan(consolidation_state="skipped",
                              consolidation_reason="no worker holds the whole model")) == \
        "pp 2, stays a pipeline: no worker holds the whole model"
    assert pipeline_text(None) == ""
