"""Property-based fuzzing of the JSON API against its own OpenAPI schema (schemathesis,
in-process over ASGI): whatever the request, the answer is never a 5xx, and it is what the
schema says: a status the operation declares, with the declared media type, body and
headers (refusals included: each an ErrorPublic). Bounded: a few dozen generated requests
per operation, as an admin (who may call every route)."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from tests.annotation.test_openapi import CONTRACT_CHECKS  # noqa: E402

MAX_EXAMPLES = 25


def _app():
    """The app on a fresh SQLite file with an admin and a small project (built at collection,
    since the schema's operations parametrize the test), removed as the tests' process ends."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    from align.formats import Candidate, PromptRecord
    from annotation import services
    from annotation.app import create_app
    from annotation.settings import Settings
    from tests.annotation.conftest import PASSWORD

    folder = Path(tempfile.mkdtemp(prefix="align-fuzz-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    app = create_app(Settings(db_url=f"sqlite:///{folder / 'fuzz.db'}"))
    with app.state.sessionmaker() as db:
        admin = services.create_user(db, "admin", PASSWORD, "admin")
        app.state.fuzz_token = services.issue_api_token(db, admin, ttl_s=3600)
        p = services.create_project(db, "p", k=2)
        services.add_prompts(db, p, [PromptRecord(f"q{i}", f"q{i}", [Candidate("a"), Candidate("b")]) for i in range(20)])
    return app


# The import's JSONL body, a string in the schema, is sent as text (UTF-8) as for text/plain.
schemathesis.serializer.alias(["application/x-ndjson", "application/jsonl"], "text/plain")
APP = _app()
schema = schemathesis.openapi.from_asgi("/api/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_answer_is_what_the_schema_says_and_none_a_server_error(case):
    token = APP.state.fuzz_token
    if case.path == "/api/tokens/current" and case.method.upper() == "DELETE":
        pytest.skip("would revoke the token the fuzzer signs its requests with")
    response = case.call(headers={"Authorization": f"Bearer {token}"})
    assert response.status_code < 500, (case.method, case.formatted_path, case.body, response.text[:500])
    case.validate_response(response, checks=CONTRACT_CHECKS)
