"""Cluster state: nodes, their devices, cold-start plans and the instances (pipeline stages)
they run, with the life cycle of each instance."""
