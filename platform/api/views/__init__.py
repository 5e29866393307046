"""Blueprints: thin views that parse, call one service and serialise."""
