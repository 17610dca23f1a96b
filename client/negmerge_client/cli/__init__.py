"""The `negmerge-client` command (jobs, models, datasets, requests, config): the REST API from
a terminal, through negmerge_client.ServiceClient. The server's own commands (`negmerge admin`,
`negmerge serve`) are not here: each command has one spelling, in the package that runs it."""

from __future__ import annotations

import click

from negmerge_client.cli.config import config
from negmerge_client.cli.datasets import datasets
from negmerge_client.cli.jobs import jobs
from negmerge_client.cli.models import models
from negmerge_client.cli.requests import requests


@click.group()
@click.version_option(package_name="negmerge-client")
def main() -> None:
    """The NegMerge service from a terminal: deletion requests, jobs, models, data sets."""


for group in (config, datasets, jobs, models, requests):
    main.add_command(group)
