"""The client against a real service: the service's own fixtures (tests/app/conftest.py: its
database, a tenant and its key, a tiny model and data set), that service over HTTP, and
`negmerge admin` to make keys with."""

from tests.app.conftest import (  # noqa: F401
    app,
    caller,
    data_root,
    db,
    make_caller,
    service_root,
    settings,
    shapes_dir,
    weights_file,
)
from tests.app.test_cli import admin  # noqa: F401
from tests.client.live_service import service_url_fixture  # noqa: F401
