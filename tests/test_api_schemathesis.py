"""Property-based API fuzzing with schemathesis against the published /openapi.json (in process, ASGI).

Every operation is called with generated (valid and invalid) data and an admin token: no response
may be a server error (5xx), and every response must match the documented schema/status codes.
Examples are kept few (2 CPU cores shared): CXR_LONG_TESTS=1 raises them.
"""
from __future__ import annotations

import os

import pytest
import schemathesis
from api_fixtures import api_env  # noqa: F401
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

MAX_EXAMPLES = 40 if os.environ.get("CXR_LONG_TESTS") == "1" else 5


# The app is built at import (building it touches no state); the session fixture then points the
# settings at its own CXR_HOME before the champion holder starts. The schema is the app's own OpenAPI
# document, taken without a request: ``from_asgi`` would run the app's lifespan at collection time,
# starting a champion poller and an audit checkpointer outside any test's isolated state (they then
# wrote into other tests' CXR_HOME and audit trail until they stopped). (schemathesis' from_fixture
# does not work with pytest 9.)
from app.main import create_app  # noqa: E402

APP = create_app()
schema = schemathesis.openapi.from_dict(APP.openapi())
schema.app = APP  # calls go to the app in process (ASGI), as with from_asgi


@pytest.fixture(scope="module")
def started(api_env):  # noqa: F811
    from core.db import get_engine

    get_engine()
    svc = APP.state.model_service
    svc.start()  # the ASGI transport does not run the lifespan: start the champion holder here
    assert svc.wait_ready(120)
    yield APP
    svc.stop()


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
def test_no_server_errors(case, api_env, started):  # noqa: F811
    response = case.call(headers=api_env.headers("admin"))
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}"
    case.validate_response(response, checks=[not_a_server_error])
