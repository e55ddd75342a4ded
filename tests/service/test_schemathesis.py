"""A short schemathesis run against the live OpenAPI schema (real uvicorn on loopback): whatever
the schema lets a client send, admin routes included (with the token), the answer is never a 5xx."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from tests.service.conftest import admin  # noqa: E402


@pytest.mark.slow  # schemathesis, on the demo artifacts
def test_no_server_error(artifact_root, serve):
    srv = serve(artifact_root, max_batch=16)
    schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {"POST /search", "POST /admin/reload"}
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def check(case):
            case.call_and_validate(checks=[not_a_server_error], headers=admin())

        check()
