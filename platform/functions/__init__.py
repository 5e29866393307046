"""Functions: the registry of model functions, their immutable versions and the alias, and the
checkpoints (models) they point at, indexed once at registration."""
