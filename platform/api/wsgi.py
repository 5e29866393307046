"""WSGI entry point: ``gunicorn hydraserve.api.wsgi:app``."""

from hydraserve.api.app import create_app

app = create_app()
