"""Cluster scheduler: planner (pipeline size, memory share, placement), network-contention model,
keep-alive and consolidation decisions. Empty until the serving path lands (see docs/architecture.md)."""
