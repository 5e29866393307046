"""Limits the data plane and the platform's planner agree on, in a module free of torch so the
scheduler can import it without loading the runtime."""

MAX_PP = 4  # pipeline stages of one group, at most (one stage per node)
