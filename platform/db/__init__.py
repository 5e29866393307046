"""Postgres schema (SQLAlchemy 2 typed models) and session handling."""
