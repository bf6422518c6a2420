"""Imports of files the training readers refuse: the import says which line, as training does,
and stores nothing."""

from __future__ import annotations

import json

import pytest

GOOD = {"kwise": {"prompt": "fine", "responses": ["a", "b"], "ranks": [0, 1]},
        "trl": {"prompt": "fine", "chosen": "a", "rejected": "b"},
        "hh": {"chosen": "\n\nHuman: fine\n\nAssistant: a", "rejected": "\n\nHuman: fine\n\nAssistant: b"},
        "oasst": {"prompt": {"message_id": "m0", "role": "prompter", "text": "fine", "replies": [
            {"message_id": "a1", "role": "assistant", "text": "a", "rank": 0},
            {"message_id": "a2", "role": "assistant", "text": "b", "rank": 1}]}}}
BAD = [
    ("kwise", '{"prompt": "hi\\ud800", "responses": ["a", "b"], "ranks": [0, 1]}', "'prompt' contains a lone surrogate"),
    ("kwise", '{"prompt": "q", "responses": ["a", "b\\udfff"], "ranks": [0, 1]}', "'responses' contains a lone surrogate"),
    ("trl", '{"prompt": "q", "chosen": "a", "rejected": "\\ud800"}', "'rejected' contains a lone surrogate"),
    ("hh", '{"chosen": "\\n\\nHuman: q\\ud800\\n\\nAssistant: a", "rejected": "\\n\\nHuman: q\\ud800\\n\\nAssistant: b"}',
     "'chosen' contains a lone surrogate"),
    ("oasst", json.dumps(GOOD["oasst"]).replace('"text": "b"', '"text": "b\\ud800"'), "message 'a2' contains a lone surrogate"),
    ("kwise", '{"prompt": "q", "responses": ["a", "b"], "ranks": [0, 1000000000000000000000000000000]}',
     "body:2: not a kwise ranking line (ranks must be integers from 0 (best) to 1"),
    ("kwise", '["hi"]', "expected a JSON object, got a list"),
    ("trl", '["chosen", "rejected"]', "expected a JSON object, got a list"),
]


@pytest.mark.parametrize("fmt,line,words", BAD)
def test_an_import_of_a_line_training_refuses_is_a_422_naming_the_line_and_stores_nothing(env, fmt, line, words):
    env.project(n_prompts=1, k=2)
    before = env.counts()
    for project in ("p", "new"):
        r = env.client.post(f"/api/projects/{project}/import?format={fmt}", headers=env.headers(env.admin_token),
                            content=(json.dumps(GOOD[fmt]) + "\n" + line + "\n").encode())
        assert r.status_code == 422 and "body:2: " in r.json()["detail"] and words in r.json()["detail"], r.text
        assert env.counts() == before
    assert env.client.get("/api/projects/new", headers=env.headers(env.admin_token)).status_code == 404


def test_a_prompt_a_template_would_not_render_as_meant_is_refused_and_an_older_one_still_exports():
    from align.formats import Ranking
    from annotation.services.imports import Invalid, checked_prompt

    assert checked_prompt([{"role": "system", "content": "be brief"}, {"role": "user", "content": "q?"}], "prompt 1")
    for messages, problem in [([{"role": "human", "content": "q?"}], "message 1 has the role 'human'"),
                              ([{"role": "user", "content": "q?"}, {"role": "assistant", "content": "Sure:"}],
                               "the prompt ends with an assistant message")]:
        with pytest.raises(Invalid, match=rf"^prompt 1: {problem}"):
            checked_prompt(messages, "prompt 1")
        # a database may hold such a prompt from before: its rankings are still rankings, and export
        assert Ranking(messages, ["a", "b"], [0, 1]).prompt == messages
