"""Limits and units the data plane, the platform's planner and the benchmarks share, in a
module free of torch so the scheduler can import it without loading the runtime."""

MB = 1_000_000  # decimal units, as links and model sizes are quoted
GB = 1_000_000_000
MAX_PP = 4  # pipeline stages of one group, at most (one stage per node)
