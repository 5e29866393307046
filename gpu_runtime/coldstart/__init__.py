"""Cold starts: the streaming zero-copy loader, runtime init overlapped with the fetch, the
node's pool of pre-started generic workers, and the per-stage cold-start timeline.

Node agent::

    plans = plan_group(model, index, pp)                       # scheduler side, once
    launched = launch_stage(prefetcher, pool, plans[i])        # on stage i's node
    launched.wait_ready(); launched.timeline(first_token)

In a worker (or a test): ``stream_stage(config, spec, open_buffer(handle), layout, dtype)``.
See docs/loading.md.
"""

from gpu_runtime.coldstart.cuda_copy import CopyConfig
from gpu_runtime.coldstart.errors import (
    AssignmentError,
    ColdStartError,
    PoolClosedError,
    StageLoadError,
    WorkerDiedError,
    WorkerFailedError,
    WorkerStartError,
    WorkerTimeoutError,
)
from gpu_runtime.coldstart.handoff import StageServer, check_server
from gpu_runtime.coldstart.launch import ColdStartGroup, LaunchedStage, launch_stage, start_fetch
from gpu_runtime.coldstart.plan import EngineShape, StageAssignment, StagePlan, plan_group
from gpu_runtime.coldstart.pool import StageHandle, WorkerPool, WorkerPoolConfig
from gpu_runtime.coldstart.stream import (
    LoadedStage,
    LoadStats,
    StreamConfig,
    stage_entries,
    stream_into,
    stream_stage,
)
from gpu_runtime.coldstart.timeline import (
    PHASES,
    ColdStartTimeline,
    StageTimeline,
    TimelineError,
)

__all__ = [
    "PHASES", "AssignmentError", "ColdStartError", "ColdStartGroup", "ColdStartTimeline",
    "CopyConfig", "EngineShape", "LaunchedStage", "LoadStats", "LoadedStage", "PoolClosedError",
    "StageAssignment", "StageHandle", "StageLoadError", "StagePlan", "StageServer",
    "StageTimeline",
    "StreamConfig", "TimelineError", "WorkerDiedError", "WorkerFailedError", "WorkerPool",
    "WorkerPoolConfig", "WorkerStartError", "WorkerTimeoutError", "check_server", "launch_stage", "plan_group",
    "stage_entries", "start_fetch", "stream_into", "stream_stage",
]
