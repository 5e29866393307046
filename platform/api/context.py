"""The request's view of the app: its per-process state, database session and settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import current_app, g
from sqlalchemy.orm import Session

from hydraserve.settings import Settings

if TYPE_CHECKING:
    from hydraserve.api.app import Extension


def extension() -> Extension:
    """The API's per-process state (settings, sessions, broker clients)."""
    return current_app.extensions["hydraserve"]


def db() -> Session:
    """The request's database session (opened on first use, closed at teardown)."""
    if "db" not in g:
        g.db = extension().session_factory()
    return g.db


def settings() -> Settings:
    return extension().settings
