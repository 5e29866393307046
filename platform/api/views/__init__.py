"""Blueprints, one per domain: thin views that parse, call one service and serialise."""
