"""The API's contract. The OpenAPI schema (/api/openapi.json) says what the API answers:
every refusal is one body (ErrorPublic: detail, and code or errors where they apply) under a
status the operation declares, and the routes whose bodies are not JSON say what they take
and send. The fuzz test (test_fuzz.py) checks the answers to generated requests; these check
the schema itself and the answers that generated requests do not reach (a task already
ranked, a browser request without its CSRF token, a body over the limit, the export's file).
And a revision (PUT) sent again stores nothing: the schema's 200 beside its 201."""

from __future__ import annotations

import json
import re

import pytest

schemathesis = pytest.importorskip("schemathesis")

# schemathesis' checks of an answer against the schema, named: its default set adds ones (e.g.
# that negative data is refused) that are not about the contract and change with its version
CONTRACT_CHECKS = [getattr(schemathesis.checks, name) for name in (
    "not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance",
    "response_headers_conformance")]
ERROR = {"$ref": "#/components/schemas/ErrorPublic"}


def _operations(spec: dict):
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            yield f"{method.upper()} {path}", operation


def test_every_refusal_is_declared_with_the_one_error_body(env):
    spec = env.client.get("/api/openapi.json").json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # FastAPI's 422, which the app never sends
    error = spec["components"]["schemas"]["ErrorPublic"]
    assert error["required"] == ["detail"] and {"code", "errors"} <= set(error["properties"])
    for name, operation in _operations(spec):
        responses = operation["responses"]
        assert {"401", "413", "503"} <= set(responses), name  # authentication, the size limit, a busy server
        if operation.get("parameters") or operation.get("requestBody"):
            assert "422" in responses, name
        for status, response in responses.items():
            if int(status) >= 400:
                assert response["content"] == {"application/json": {"schema": ERROR}}, (name, status)
                assert response["description"], (name, status)
            if status in ("429", "503"):
                assert response["headers"]["Retry-After"]["required"], (name, status)
    operations = dict(_operations(spec))
    assert {"200", "201"} <= set(operations["PUT /api/tasks/{task_id}/ranking"]["responses"])
    for name in ("DELETE /api/tokens/current", "POST /api/tasks/{task_id}/ranking", "POST /api/projects"):
        assert {"401", "403"} <= set(operations[name]["responses"]), name
    assert "400" in operations["DELETE /api/tokens/current"]["responses"]
    for name in ("GET /api/projects/{name}", "GET /api/tasks/{task_id}", "POST /api/users/{username}/activate"):
        assert "404" in operations[name]["responses"], name


def test_the_import_declares_its_file_and_the_export_its_media_type_and_header(env):
    spec = env.client.get("/api/openapi.json").json()
    body = spec["paths"]["/api/projects/{name}/import"]["post"]["requestBody"]
    assert body["required"] and {"application/x-ndjson", "text/plain", "application/octet-stream"} <= set(body["content"])
    ok = spec["paths"]["/api/projects/{name}/export"]["get"]["responses"]["200"]
    assert list(ok["content"]) == ["application/x-ndjson"] and "X-Align-Left-Out" in ok["headers"]


def _conforms(schema, method: str, path: str, response) -> None:
    """`response` is what `schema` says the operation `method path` answers (schemathesis' checks)."""
    sent = re.fullmatch(re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path), response.request.url.path)
    case = schema[path][method].Case(path_parameters=sent.groupdict())
    case.validate_response(response, checks=CONTRACT_CHECKS)


def _schema(env):
    return schemathesis.openapi.from_dict(env.client.get("/api/openapi.json").json())


def test_answers_the_fuzzer_does_not_reach_are_what_the_schema_says(env):
    from annotation import services

    env.project(n_prompts=2, k=2)
    tok = env.annotator("ann")
    admin, h = env.headers(env.admin_token), env.headers(tok)
    c = env.client
    task = c.post("/api/projects/p/next", headers=h).json()
    ids = [x["id"] for x in task["candidates"]]
    ranking = "/api/tasks/{task_id}/ranking"
    url = f"/api/tasks/{task['id']}/ranking"
    schema = _schema(env)

    def check(method, path, response, status, code=None):
        assert response.status_code == status, response.text
        if code is not None:
            assert response.json()["code"] == code
        _conforms(schema, method, path, response)

    check("POST", ranking, c.post(url, headers=h, json={"order": ids}), 201)
    check("POST", ranking, c.post(url, headers=h, json={"order": ids}), 409, "already_ranked")
    check("POST", "/api/tasks/{task_id}/skip", c.post(f"/api/tasks/{task['id']}/skip", headers=h,
                                                      json={"reason": "x"}), 409, "already_ranked")
    check("POST", "/api/tasks/{task_id}/lease", c.post(f"/api/tasks/{task['id']}/lease", headers=h), 409, "already_ranked")
    check("PUT", ranking, c.put(url, headers=h, json={"order": ids}), 200)
    check("PUT", ranking, c.put(url, headers=h, json={"order": ids[::-1]}), 201)
    check("GET", "/api/tasks/{task_id}", c.get(f"/api/tasks/{task['id']}", headers=admin), 403)
    check("GET", "/api/users", c.get("/api/users", headers=h), 403)
    check("GET", "/api/me", c.get("/api/me"), 401)
    check("DELETE", "/api/tokens/current", c.delete("/api/tokens/current", headers=env.headers("aln_forged")), 401)
    invalid = c.post("/api/projects", headers=admin, json={"name": "x", "k": "3"})
    check("POST", "/api/projects", invalid, 422)
    assert invalid.json()["errors"][0]["loc"] == ["body", "k"]
    check("POST", "/api/projects", c.post("/api/projects", headers=admin, json={"name": "x" * (1 << 17)}), 413)
    check("GET", "/api/projects/{name}", c.get("/api/projects/nope", headers=admin), 404)
    # the import takes the file as its body, as the schema says, and the export sends JSONL
    line = json.dumps({"prompt": "imported?", "candidates": ["a", "b"]}) + "\n"
    check("POST", "/api/projects/{name}/import", c.post(
        "/api/projects/p/import?format=prompts", headers={**admin, "Content-Type": "application/x-ndjson"},
        content=line.encode()), 201)
    exported = c.get("/api/projects/p/export", headers=admin)
    check("GET", "/api/projects/{name}/export", exported, 200)
    assert exported.headers["content-type"] == "application/x-ndjson"
    # a browser's request without the page's CSRF token
    with env.db() as db:
        session = services.open_web_session(db, services.get_user(db, "ann"))
    c.cookies.set("align_session", session)
    check("POST", "/api/projects/{name}/next", c.post("/api/projects/p/next"), 403, "csrf_token")
    c.cookies.clear()
    check("DELETE", "/api/tokens/current", c.delete("/api/tokens/current", headers=h), 204)


def test_an_answer_the_schema_does_not_declare_is_caught(env):
    """The checks above can fail: a status the operation does not declare, a refusal that is no
    ErrorPublic."""
    import datetime

    import httpx

    def answer(path, status, body):
        response = httpx.Response(status, json=body, request=httpx.Request("GET", f"http://testserver{path}"))
        response.elapsed = datetime.timedelta(0)  # as a client that sent it sets it
        return response

    schema = _schema(env)
    with pytest.raises(schemathesis.errors.FailureGroup, match="Undocumented status code"):
        _conforms(schema, "GET", "/api/me", answer("/api/me", 404, {"detail": "gone"}))
    with pytest.raises(schemathesis.errors.FailureGroup, match="detail. is a required property"):
        _conforms(schema, "GET", "/api/projects/{name}", answer("/api/projects/p", 404, {"message": "x"}))


def test_a_revision_sent_again_stores_nothing_and_answers_the_latest(env):
    """PUT /api/tasks/{id}/ranking is idempotent: a client that resends a PUT whose answer it
    lost (urllib3's Retry does) gets the revision back with 200 and no copy is stored; a
    changed ranking is a new revision (201), also one that goes back to an earlier ranking."""
    env.project(n_prompts=1, k=3)
    tok = env.annotator("ann")
    task = env.client.post("/api/projects/p/next", headers=env.headers(tok)).json()
    a, b, c = (x["id"] for x in task["candidates"])
    url = f"/api/tasks/{task['id']}/ranking"

    def put(status, revision, **ranking):
        r = env.client.put(url, headers=env.headers(tok), json=ranking)
        assert (r.status_code, r.json()["revision"]) == (status, revision), r.text
        return r.json()

    first = env.client.post(url, headers=env.headers(tok), json={"order": [[a, b], [c]], "time_spent_ms": 9}).json()
    # the same ranking: ids in a tie in another order, a bare id for a group of one, no time spent
    assert put(200, 1, order=[[b, a], c]) == first
    assert put(200, 1, order=[[a, b], [c]], rationale="", all_bad=False, time_spent_ms=5) == first
    second = put(201, 2, order=[[a, b], [c]], rationale="tied")
    for _ in range(2):
        assert put(200, 2, order=[[a, b], [c]], rationale="tied") == second
    put(201, 3, order=[[a, b], [c]], rationale="tied", all_bad=True)
    put(201, 4, order=[[a, b], [c]])  # back to the first ranking: a revision of its own
    put(201, 5, order=[a, b, c])
    put(200, 5, order=[[a], [b], [c]])
    assert env.counts()["rankings"] == 5
