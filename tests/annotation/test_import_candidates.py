"""A prompts import that brings candidates for a prompt the project holds: attached to one
that has none, a duplicate when they are the same, refused when they differ; and every
refusal names the file and line (or the request's item) and the prompt's id."""

from __future__ import annotations

import json

import pytest

from tests.annotation.cli_runs import run_cli as _run


def _write(path, *lines) -> str:
    path.write_text("".join(line if isinstance(line, str) and not line.strip() else json.dumps(line) + "\n"
                            for line in lines))
    return str(path)


def _rows(db_file) -> list:
    """Every prompt and candidate, as stored."""
    import sqlite3

    with sqlite3.connect(db_file) as con:
        return [con.execute("select id, source_id, n_candidates, slots_taken from prompts order by id").fetchall(),
                con.execute("select prompt_id, position, text from candidates order by prompt_id, position").fetchall()]


def _candidates_of(db_file, source_id: str) -> list[str]:
    import sqlite3

    with sqlite3.connect(db_file) as con:
        return [t for (t,) in con.execute("select c.text from candidates c join prompts p on p.id = c.prompt_id "
                                          "where p.source_id = ? order by c.position", (source_id,))]


@pytest.mark.parametrize("with_id", [True, False], ids=["by id", "by text"])
def test_candidates_for_a_prompt_without_any_are_attached_the_same_again_skipped_and_others_refused(
        tmp_path, capsys, with_id):
    """They were dropped as "1 already present" (rc 0), the prompt left without candidates."""
    db_file = tmp_path / "a.db"
    db = f"sqlite:///{db_file}"
    ident = {"id": "q2"} if with_id else {}
    prompt = {**ident, "prompt": "Capital of France?"}
    imp = ["annotate", "import", "--db", db, "-p", "I", "-f", "prompts"]
    assert _run(imp + ["--k", "2", _write(tmp_path / "bare.jsonl", prompt)], capsys) == (
        0, "I: 1 prompts, 0 candidates, 0 rankings imported; 0 already present\n")
    code, text = _run(imp + [_write(tmp_path / "paris.jsonl", {**prompt, "candidates": ["Paris", "Lyon"]})], capsys)
    assert (code, text) == (0, "I: 0 prompts, 2 candidates, 0 rankings imported; 0 already present\n")
    sid = "q2" if with_id else _rows(db_file)[0][0][1]
    assert _candidates_of(db_file, sid) == ["Paris", "Lyon"]
    from annotation import services
    from annotation.db import open_db

    sm = open_db(db)
    with sm() as s:
        assert services.project_progress(s, services.get_project(s, "I"))["rankable_prompts"] == 1
    sm.kw["bind"].dispose()
    code, text = _run(imp + [_write(tmp_path / "again.jsonl", {**prompt, "candidates": ["Lyon", "Paris"]}, prompt)],
                      capsys)
    assert (code, text) == (0, "I: 0 prompts, 0 candidates, 0 rankings imported; 2 already present\n")

    before = _rows(db_file)
    other = _write(tmp_path / "other.jsonl", {"id": "fresh", "prompt": "new?", "candidates": ["a", "b"]}, "\n",
                   {**prompt, "candidates": ["Paris", "Marseille"]})
    code, text = _run(imp + [other], capsys)
    assert code == 2 and len(text.strip().splitlines()) == 1 and "Traceback" not in text, text
    assert text.startswith(f"error: {other}:3: {'prompt ' + repr('q2') if with_id else 'the prompt'} already has "
                           "other candidates in project 'I'"), text
    assert _rows(db_file) == before  # all or nothing: not the new prompt either


def test_candidates_are_attached_across_chunks_and_within_one_and_each_import_is_all_or_nothing(db_url, monkeypatch):
    """Within a file too: a prompt without candidates, then the same prompt with them, is one
    prompt with them, whether the two lines fall in one chunk or two; K is the project's."""
    from align.formats import Candidate, PromptRecord
    from annotation import services
    from annotation.db import open_db
    from annotation.services import imports

    monkeypatch.setattr(imports, "IMPORT_CHUNK", 2)
    monkeypatch.setattr(imports, "IMPORT_PAUSE_S", 0)
    sm = open_db(db_url)
    two = [Candidate("x"), Candidate("y")]
    with sm() as db:
        p = services.create_project(db, "c", k=2)
        services.add_prompts(db, p, [PromptRecord("stored?", "s")])
        # chunks: [a, b] [a+, s+] [b+, c]
        records = [PromptRecord("a?", "a"), PromptRecord("b?", "b"), PromptRecord("a?", "a", two),
                   PromptRecord("stored?", "s", two), PromptRecord("b?", "b", two), PromptRecord("c?", "c", two)]
        report = services.add_prompts(db, p, records)
        assert vars(report) == {"prompts_added": 3, "candidates_added": 8, "rankings_added": 0, "duplicates_skipped": 0}
        assert services.project_progress(db, p)["rankable_prompts"] == 4
        assert services.prompts_without_candidates(db, p) == []
        with pytest.raises(services.Invalid, match=r"^item 3 of the request: prompt 'a' has 3 candidates; project 'c' "
                                                   r"ranks K=2"):
            services.add_prompts(db, p, [PromptRecord("later?", "l"), PromptRecord("d?", "d"),
                                         PromptRecord("a?", "a", [*two, Candidate("z")])])
        with pytest.raises(services.Invalid, match=r"^item 3 of the request: prompt 'l' already has other candidates"):
            services.add_prompts(db, p, [PromptRecord("later?", "l", two), PromptRecord("d?", "d"),
                                         PromptRecord("later?", "l", [Candidate("x"), Candidate("z")])])
        assert services.project_progress(db, p)["prompts"] == 4  # neither stored anything
    sm.kw["bind"].dispose()


def test_the_api_attaches_candidates_once_and_refuses_another_set_naming_the_item(env):
    """Two items of one prompt with different candidates were a 201 with the second set
    dropped (duplicates_skipped 1)."""
    env.project(n_prompts=1, k=2)
    h = env.headers(env.admin_token)
    url = "/api/projects/p/prompts"
    r = env.client.post(url, headers=h, json={"prompts": [{"prompt": "Capital?", "candidates": ["Paris", "Lyon"]},
                                                          {"prompt": "Capital?", "candidates": ["Rome", "Milan"]}]})
    assert r.status_code == 422 and r.json()["detail"].startswith(
        "item 2 of the request: the prompt already has other candidates in project 'p'"), r.text
    assert env.client.get("/api/projects/p", headers=h).json()["progress"]["prompts"] == 1
    r = env.client.post(url, headers=h, json={"prompts": [{"prompt": "Later?", "id": "l"},
                                                          {"prompt": "Later?", "id": "l", "candidates": ["a", "b"]}]})
    assert r.status_code == 201 and r.json() == {"prompts_added": 1, "candidates_added": 2, "rankings_added": 0,
                                                 "duplicates_skipped": 0}, r.text
    r = env.client.post(url, headers=h, json={"prompts": [{"prompt": "Later?", "id": "l", "candidates": ["b", "a"]}]})
    assert r.status_code == 201 and r.json()["duplicates_skipped"] == 1
    r = env.client.post(url, headers=h, json={"prompts": [{"prompt": "Later?", "id": "l", "candidates": ["b", "c"]}]})
    assert r.status_code == 422 and r.json()["detail"].startswith(
        "item 1 of the request: prompt 'l' already has other candidates"), r.text
    token = env.annotator("ann")  # the prompt given candidates is ranked like any other
    seen = set()
    while (r := env.client.post("/api/projects/p/next", headers=env.headers(token))).status_code == 200:
        seen.add(r.json()["prompt"])
        ids = [c["id"] for c in r.json()["candidates"]]
        r = env.client.post(f"/api/tasks/{r.json()['id']}/ranking", headers=env.headers(token),
                            json={"order": [[i] for i in ids]})
        assert r.status_code == 201, r.text
    assert seen == {"prompt 0?", "Later?"}


def test_refused_prompts_are_named_by_file_and_line_and_their_id_never_by_a_record_number_or_hash(tmp_path, capsys):
    """"prompt 6 is longer than 100000 characters" was line 8 of a file with two blank lines
    at the top; a K mismatch named a content hash; a file of 1-candidate prompts said
    "k must be an integer between 2 and 16, got 1", of a --k the user never passed."""
    db_file = tmp_path / "m.db"
    db = f"sqlite:///{db_file}"
    ok = [{"id": f"q{i}", "prompt": f"question {i}?"} for i in range(5)]
    cases = [
        ("long.jsonl", ["\n", "\n", *ok, {"id": "q6", "prompt": "x" * 100_001}],
         "long.jsonl:8: prompt 'q6' is longer than 100000 characters"),
        ("nul.jsonl", [*ok, "\n", {"prompt": "a\x00b"}], "nul.jsonl:7: the prompt contains a NUL"),
        ("one.jsonl", [{"id": "a", "prompt": "x"}, "\n", {"id": "b", "prompt": "y", "candidates": ["only"]}],
         "one.jsonl:3: prompt 'b' has 1 candidate; a prompt is ranked among 2 to 16 candidates"),
        ("mixed.jsonl", [{"prompt": "x", "candidates": ["a", "b"]}, {"id": "c3", "prompt": "y", "candidates": ["a", "b", "c"]}],
         "mixed.jsonl:2: prompt 'c3' has 3 candidates, where "),
    ]
    for name, lines, words in cases:
        code, text = _run(["annotate", "import", _write(tmp_path / name, *lines), "--db", db, "-p", "new", "-f", "prompts"],
                          capsys)
        assert code == 2 and f"error: {tmp_path / words}" in text and len(text.strip().splitlines()) == 1, text
        assert "k must be" not in text and "prompt 6" not in text
    _run(["annotate", "import", _write(tmp_path / "k2.jsonl", {"prompt": "x", "candidates": ["a", "b"]}), "--db", db,
          "-p", "k2", "-f", "prompts"], capsys)
    code, text = _run(["annotate", "import", _write(tmp_path / "k3.jsonl", "\n", {"prompt": "y", "candidates": ["a", "b", "c"]}),
                       "--db", db, "-p", "k2", "-f", "prompts"], capsys)
    assert code == 2 and f"{tmp_path / 'k3.jsonl'}:2: the prompt has 3 candidates; project 'k2' ranks K=2" in text, text
    assert "p-" not in text


def test_an_import_body_names_its_line(env):
    r = env.client.post("/api/projects/b/import?format=prompts", headers=env.headers(env.admin_token),
                        content=b'\n{"id": "q1", "prompt": "x", "candidates": ["a", "b"]}\n'
                                b'{"id": "q2", "prompt": "y", "candidates": ["a", "b\\u0000"]}\n')
    assert r.status_code == 422 and r.json()["detail"].startswith("body:3: candidate 2 of prompt 'q2' contains a NUL"), r.text


def test_rankings_of_a_prompt_imported_without_candidates_bring_them(tmp_path, capsys):
    """A prompts file first, then the rankings made elsewhere of those prompts: they were refused as
    "has other responses" (the prompt had none)."""
    import sqlite3

    db_file = tmp_path / "r.db"
    db = f"sqlite:///{db_file}"
    assert _run(["annotate", "import", "--db", db, "-p", "R", "-f", "prompts", "--k", "3",
                 _write(tmp_path / "prompts.jsonl", {"id": "q1", "prompt": "Name a colour."})], capsys)[0] == 0
    ranking = {"prompt_id": "q1", "prompt": "Name a colour.", "responses": ["red", "blue", "cat"], "ranks": [1, 0, 2],
               "annotator": "ann-1", "candidate_ids": ["c-red", "c-blue", "c-cat"]}
    again = {**ranking, "annotator": "ann-2", "responses": ["cat", "red", "blue"], "ranks": [2, 0, 1],
             "candidate_ids": ["c-cat", "c-red", "c-blue"]}
    rankings = _write(tmp_path / "rankings.jsonl", ranking, again)
    code, text = _run(["annotate", "import", "--db", db, "-p", "R", "-f", "kwise", rankings], capsys)
    assert (code, text) == (0, "R: 0 prompts, 3 candidates, 2 rankings imported; 0 already present\n")
    assert _candidates_of(db_file, "q1") == ["red", "blue", "cat"]
    with sqlite3.connect(db_file) as con:
        assert con.execute("select n_candidates, slots_taken, done_count from prompts").fetchall() == [(3, 2, 2)]
        assert con.execute("select source_id from candidates order by position").fetchall() == [
            ("c-red",), ("c-blue",), ("c-cat",)]
    # exported as imported: each annotator's order of the same three texts
    out = tmp_path / "out.jsonl"
    assert _run(["annotate", "export", "--db", db, "-p", "R", "--format", "kwise", "-o", str(out)], capsys)[0] == 0
    exported = {r["annotator"].removeprefix("src:"): r for r in map(json.loads, out.read_text().splitlines())}
    for sent in (ranking, again):
        got = exported[sent["annotator"]]
        assert dict(zip(got["responses"], got["ranks"])) == dict(zip(sent["responses"], sent["ranks"]))
    assert _run(["annotate", "import", "--db", db, "-p", "R", "-f", "kwise", rankings], capsys) == (
        0, "R: 0 prompts, 0 candidates, 0 rankings imported; 2 already present\n")
