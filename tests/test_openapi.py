"""GET /v1/openapi.json: a valid OpenAPI 3.1 document of every route of the API; and the check
that holds every answer of the test suite to it (tests/openapi.py) refuses what it should."""

from __future__ import annotations

from pathlib import Path

import pytest
from openapi_spec_validator import validate

from relayd.api import make_app
from relayd.mock import provider as mock_provider
from relayd.mock.receiver import Receiver
from tests import openapi
from tests.conftest import api, config_dict, make_config, running
from tests.test_api import FakeBackend


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = openapi.document()
    assert doc["openapi"].startswith("3.1")
    validate(doc)


def test_every_route_is_described_and_nothing_else() -> None:
    """The routes make_app serves (the console's aside) are exactly the document's."""
    app = make_app(FakeBackend())
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    described = {
        (method.upper(), path)
        for path, item in openapi.document()["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert served == described


async def test_the_api_serves_it(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    config = make_config(config_dict(tmp_path, provider.port, {"app": receiver.port}), tmp_path)
    async with running(config) as daemon:
        status, doc = await api(daemon, "GET", "/v1/openapi.json")
    assert status == 200 and doc == openapi.document()


def test_the_check_refuses_an_undocumented_status_and_a_wrong_body() -> None:
    job = {"provider": "main", "docId": "x", "state": "polling"}  # fields missing
    with pytest.raises(AssertionError, match="does not match"):
        openapi.check("GET", "/v1/jobs", 200, {"jobs": [job], "truncated": False},
                      "application/json")  # fmt: skip
    with pytest.raises(AssertionError, match="does not list"):
        openapi.check("GET", "/v1/jobs/main/x", 418, {"error": "teapot"}, "application/json")
    with pytest.raises(AssertionError, match="does not match"):
        openapi.check("POST", "/v1/jobs", 400, {"message": "no"}, "application/json")
    openapi.check("GET", "/v1/jobs/main/x", 404, {"error": "no job main/x"}, "application/json")
    openapi.check("GET", "/ui/jobs", 200, "<html>", "text/html")  # the console's: not the API's
