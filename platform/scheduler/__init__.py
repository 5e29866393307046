"""Cluster scheduler: the pure planner (pipeline size, memory share, placement) and link
contention model, the scheduler's read of the cluster, the actions it takes, and the loop that
applies them (one leader, standbys)."""
