"""HydraServe data plane: models, stages, loader, KV cache, engine, channel, prefetcher.

Nothing in this package imports Flask or SQLAlchemy; the control plane (``hydraserve``) calls
into it, never the other way round.
"""
