"""The ``hydraserve`` command line. Each command delegates to a service or to the REST API."""

from __future__ import annotations

import click

from hydraserve.cli.admin import admin
from hydraserve.cli.billing import billing
from hydraserve.cli.cluster import cluster
from hydraserve.cli.db import db
from hydraserve.cli.functions import functions
from hydraserve.cli.models import make_demo_model, models
from hydraserve.cli.node import node, scheduler
from hydraserve.cli.store import store


@click.group()
def main() -> None:
    """HydraServe: serverless LLM functions with fast cold starts."""


for command in (db, admin, billing, functions, make_demo_model, models, cluster, store, node,
                scheduler):
    main.add_command(command)
