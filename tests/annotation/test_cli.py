"""`align annotate` commands: import, export, accounts, generate; user mistakes exit 2."""

from __future__ import annotations

import json

import pytest

from align.commands.cli import main
from align.formats import read_kwise


def run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out + out.err


def ok(argv, capsys):
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr()
    return capsys.readouterr().out


def test_import_export_round_trip_and_reimport(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'a.db'}"
    src = tmp_path / "trl.jsonl"
    src.write_text(json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) + "\n"
                   + json.dumps({"prompt": "capital of France?", "chosen": "Paris", "rejected": "Lyon"}) + "\n")
    assert "2 rankings imported" in ok(["annotate", "import", str(src), "--db", db, "-p", "t", "-f", "trl"], capsys)
    assert "2 already present" in ok(["annotate", "import", str(src), "--db", db, "-p", "t", "-f", "trl"], capsys)
    for fmt in ("kwise", "trl", "hh"):
        out = tmp_path / f"out-{fmt}.jsonl"
        assert "2 " + fmt in ok(["annotate", "export", "--db", db, "-p", "t", "-f", fmt, "-o", str(out)], capsys)
    k = read_kwise(tmp_path / "out-kwise.jsonl")
    assert sorted((r.prompt, r.responses, r.ranks, r.annotator) for r in k) == [
        ("2+2?", ["4", "5"], [0, 1], "src:trl"), ("capital of France?", ["Paris", "Lyon"], [0, 1], "src:trl")]
    pairs = [json.loads(line) for line in (tmp_path / "out-trl.jsonl").read_text().splitlines()]
    assert {(p["prompt"], p["chosen"], p["rejected"]) for p in pairs} == {("2+2?", "4", "5"), ("capital of France?", "Paris", "Lyon")}
    hh = json.loads((tmp_path / "out-hh.jsonl").read_text().splitlines()[0])
    assert hh["chosen"].startswith("\n\nHuman: ") and "\n\nAssistant: " in hh["chosen"]
    out = tmp_path / "every.jsonl"  # every revision: of these imported rankings, one each
    assert "2 kwise" in ok(["annotate", "export", "--db", db, "-p", "t", "--all-revisions", "-o", str(out)], capsys)
    assert read_kwise(out) == read_kwise(tmp_path / "out-kwise.jsonl")
    code, text = run(["annotate", "export", "--db", db, "-p", "t", "-f", "trl", "--all-revisions", "-o", str(out)], capsys)
    assert code == 2 and "kwise format only" in text and len(text.strip().splitlines()) == 1


def test_user_mistakes_exit_2_without_traceback(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'b.db'}"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "a"}\n')
    bad_ranks = tmp_path / "bad_ranks.jsonl"
    bad_ranks.write_text('{"prompt": "x", "prompt_id": "r1", "responses": ["a", "b"], "ranks": ["a", 0]}\n')
    cases = [
        (["annotate", "import", str(bad_ranks), "--db", db, "-p", "t", "-f", "kwise"], f"{bad_ranks}:1: not a kwise ranking line (ranks must be a list of integers >= 0"),
        (["annotate", "import", str(tmp_path / "none.jsonl"), "--db", db, "-p", "t", "-f", "trl"], "file not found"),
        (["annotate", "import", str(bad), "--db", db, "-p", "t", "-f", "trl"], "bad.jsonl:1"),
        (["annotate", "import", str(bad), "--db", db, "-p", "t", "-f", "csv"], "unknown import format"),
        (["annotate", "export", "--db", db, "-p", "nope", "-o", str(tmp_path / "o.jsonl")], "no project 'nope'"),
        (["annotate", "export", "--db", "mysql://x", "-p", "t", "-o", str(tmp_path / "o.jsonl")], "cannot"),
    ]
    for argv, msg in cases:
        code, text = run(argv, capsys)
        assert code == 2 and msg in text and "Traceback" not in text and len(text.strip().splitlines()) == 1, (argv, text)


def test_accounts_need_a_password_and_tokens_work(tmp_path, capsys, monkeypatch):
    db = f"sqlite:///{tmp_path / 'c.db'}"
    monkeypatch.delenv("ALIGN_ADMIN_PASSWORD", raising=False)
    code, text = run(["annotate", "create-admin", "root", "--db", db], capsys)
    assert code == 2 and "ALIGN_ADMIN_PASSWORD" in text  # no default credentials, no tty here
    for weak, message in (("short", "at least 15 characters"), ("a 14-char pass", "at least 15 characters"),
                          ("password1234567", "known-compromised")):
        monkeypatch.setenv("ALIGN_ADMIN_PASSWORD", weak)
        code, text = run(["annotate", "create-admin", "root", "--db", db], capsys)
        assert code == 2 and message in text and "Traceback" not in text and len(text.strip().splitlines()) == 1
    monkeypatch.setenv("ALIGN_ADMIN_PASSWORD", "a long admin password")
    assert "created" in ok(["annotate", "create-admin", "root", "--db", db], capsys)
    monkeypatch.setenv("ALIGN_USER_PASSWORD", "annotator password")
    token = ok(["annotate", "create-user", "ann", "--token", "--db", db], capsys).strip().splitlines()[-1]
    assert token.startswith("aln_")
    monkeypatch.setenv("ALIGN_USER_PASSWORD", "too short")
    code, text = run(["annotate", "set-password", "ann", "--db", db], capsys)
    assert code == 2 and "at least 15 characters" in text
    monkeypatch.setenv("ALIGN_USER_PASSWORD", "a new annotator password")
    assert "changed" in ok(["annotate", "set-password", "ann", "--db", db], capsys)
    link = ok(["annotate", "invite", "--db", db], capsys).strip()
    assert "/invite/" in link
    from annotation import services
    from annotation.db import open_db

    with open_db(db)() as s:
        assert services.user_for_token(s, token) is None  # a new password revokes the account's tokens
        user = services.accept_invite(s, link.rsplit("/", 1)[1], "newbie", "a fresh key phrase")
        assert user.role == "annotator"
        with pytest.raises(services.NotFound):  # one use only
            services.accept_invite(s, link.rsplit("/", 1)[1], "again", "another password")


def test_generate_fills_prompts_with_k_candidates(tmp_path, capsys, tiny_random_model):
    db = f"sqlite:///{tmp_path / 'g.db'}"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in ["how are you", "tell me a joke", "what is tea"]) + "\n")
    ok(["annotate", "import", str(prompts), "--db", db, "-p", "gen", "-f", "prompts", "--k", "3"], capsys)
    out = ok(["annotate", "generate", "--db", db, "-p", "gen", "--model", str(tiny_random_model), "--k", "3",
              "--response-length", "8"], capsys)
    assert "9 candidates generated (3 for each of 3 prompts)" in out
    from annotation import services
    from annotation.db import open_db
    from annotation.models import Prompt

    with open_db(db)() as s:
        rows = s.query(Prompt).all()
        assert all(p.n_candidates == 3 and len(p.candidates) == 3 for p in rows)
        assert all(c.model == str(tiny_random_model) and c.sampling["max_new_tokens"] == 8 for p in rows for c in p.candidates)
        project = services.get_project(s, "gen")
        assert services.project_progress(s, project)["rankable_prompts"] == 3
    # a second run has nothing left to do
    assert "no prompt is without its 3 candidates; nothing generated" in ok(["annotate", "generate", "--db", db, "-p", "gen", "--model", str(tiny_random_model), "--k", "3"], capsys)


def test_generate_leaves_prompts_that_another_run_filled_meanwhile_as_they_are(tmp_path, capsys, tiny_random_model,
                                                                               monkeypatch):
    """Two generate runs at once on one project: the one that stored second exited 1 with an
    IntegrityError traceback (UNIQUE candidates.prompt_id, position). Its prompts are read
    once, before sampling; those the other run filled meanwhile keep its candidates, and a
    line says how many."""
    import align.generation
    from annotation import services
    from annotation.db import open_db
    from annotation.models import Prompt

    db = f"sqlite:///{tmp_path / 'race.db'}"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in ["how are you", "tell me a joke", "what is tea"]) + "\n")
    ok(["annotate", "import", str(prompts), "--db", db, "-p", "gen", "-f", "prompts", "--k", "2"], capsys)
    sample = align.generation.generate_responses

    def sampled_while_another_run_stored(*args, **kwargs):
        outs = sample(*args, **kwargs)
        with open_db(db)() as s:
            for prompt in services.prompts_without_candidates(s, services.get_project(s, "gen"))[:2]:
                services.add_candidates(s, prompt, ["other a", "other b"], model="other run")
        return outs

    monkeypatch.setattr(align.generation, "generate_responses", sampled_while_another_run_stored)
    with pytest.raises(SystemExit) as exc:
        main(["annotate", "generate", "--db", db, "-p", "gen", "--model", str(tiny_random_model), "--response-length", "4"])
    out = capsys.readouterr()
    assert exc.value.code in (0, None), out
    assert out.out == "gen: 2 candidates generated (2 for each of 1 prompt)\n" and "Traceback" not in out.err, out
    assert "2 prompts of 'gen' got candidates from another generate run or an import" in out.err, out.err
    with open_db(db)() as s:
        models = sorted(c.model for p in s.query(Prompt).all() for c in p.candidates)
    assert models == sorted(["other run"] * 4 + [str(tiny_random_model)] * 2)


def test_a_sampled_nul_character_is_stored_as_the_replacement_character(tmp_path, capsys, tiny_random_model,
                                                                         monkeypatch):
    """A byte-level tokenizer can sample <0x00>: the candidate is kept with U+FFFD in its place (no
    database text holds NUL), where the whole generate run stopped, and stopped again on every rerun."""
    import align.generation
    from annotation.db import open_db
    from annotation.models import Prompt

    db = f"sqlite:///{tmp_path / 'nul.db'}"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in ["how are you", "what is tea"]) + "\n")
    ok(["annotate", "import", str(prompts), "--db", db, "-p", "gen", "-f", "prompts", "--k", "2"], capsys)
    monkeypatch.setattr(align.generation, "generate_responses",
                        lambda model, tokenizer, prompts, **_: [["fine\x00 thanks", "good"], ["green", "black\x00"]])
    with pytest.raises(SystemExit) as exc:
        main(["annotate", "generate", "--db", db, "-p", "gen", "--model", str(tiny_random_model)])
    out = capsys.readouterr()
    assert exc.value.code in (0, None) and out.out == "gen: 4 candidates generated (2 for each of 2 prompts)\n", out
    assert "2 candidates of 'gen' held a NUL character, stored as U+FFFD" in out.err
    with open_db(db)() as s:
        texts = sorted(c.text for p in s.query(Prompt).all() for c in p.candidates)
    assert texts == sorted(["fine\ufffd thanks", "good", "green", "black\ufffd"])


@pytest.mark.parametrize("option,value,word", [
    ("--temperature", "0", "--temperature must be a finite number above 0"),
    ("--temperature", "-1", "--temperature must be a finite number above 0"),
    ("--temperature", "inf", "--temperature must be a finite number above 0"),
    ("--temperature", "nan", "--temperature must be a finite number above 0"),
    ("--top-p", "0", "--top-p must be above 0 and at most 1"),
    ("--top-p", "1.5", "--top-p must be above 0 and at most 1"),
    ("--seed", str(2**64), "--seed"),
])
def test_generate_refuses_settings_that_do_not_sample_before_the_model_loads(tmp_path, capsys, option, value, word):
    """K candidates per prompt are sampled: temperature 0 was accepted and failed inside
    transformers ('Greedy methods ... num_return_sequences'), top_p 0 gave K equal
    candidates, a seed beyond 64 bits overflowed in torch; each is one line, exit 2,
    before the model (here a path that is not there) is looked at."""
    db = f"sqlite:///{tmp_path / 'g.db'}"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps("how are you") + "\n")
    ok(["annotate", "import", str(prompts), "--db", db, "-p", "gen", "-f", "prompts", "--k", "2"], capsys)
    code, text = run(["annotate", "generate", "--db", db, "-p", "gen", "--model", str(tmp_path / "no-model"),
                      option, value], capsys)
    assert code == 2 and word in text and "Traceback" not in text, text
    if option != "--seed":  # typer's own range message for an integer option
        assert len(text.strip().splitlines()) == 1, text


def _projects(db_file) -> list:
    import sqlite3

    if not db_file.exists():
        return []
    with sqlite3.connect(db_file) as con:
        try:
            return [r[0] for r in con.execute("select name from projects")]
        except sqlite3.OperationalError:
            return []


@pytest.mark.parametrize("name,content,word", [
    ("latin1.jsonl", '{"prompt": "caf\xe9?"}\n'.encode("latin-1"), "not UTF-8"),
    ("empty.jsonl", b"", "no records"),
    ("truncated.jsonl.gz", None, "truncated gzip"),
    ("bad.jsonl", b'{"prompt": \n', "not valid JSON"),
    ("candidates.jsonl", b'{"prompt": "x", "candidates": 5}\n', "'candidates' must be a list"),
    ("sampling.jsonl", b'{"prompt": "x", "candidates": [{"text": "a", "sampling": 5}, "b"]}\n', ":1: candidate 1: 'sampling'"),
    ("nan.jsonl", b'{"prompt": "x", "candidates": [{"text": "a", "sampling": {"t": NaN}}, "b"]}\n', "NaN is not a JSON value"),
])
def test_unreadable_import_files_exit_2_with_one_line_and_create_nothing(tmp_path, capsys, name, content, word):
    import gzip

    db_file = tmp_path / "c.db"
    path = tmp_path / name
    if content is None:
        content = gzip.compress(b'{"prompt": "hello there"}\n' * 200)[:-30]
    path.write_bytes(content)
    code, text = run(["annotate", "import", str(path), "--db", f"sqlite:///{db_file}", "-p", "x", "-f", "prompts"], capsys)
    lines = [line for line in text.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and word in text and "Traceback" not in text, text
    assert _projects(db_file) == []


def test_a_refused_ranking_is_named_by_its_place_in_the_file_not_by_a_hash(tmp_path, capsys):
    """A kwise ranking of one response said "ranking 'kwise-2e638b8418008696' has fewer than
    2 responses", a content hash the file does not hold: it is named by its place in the
    file, with the file's prompt id when it gave one, and nothing is created."""
    db_file = tmp_path / "r.db"
    src = tmp_path / "k.jsonl"
    good = {"prompt": "fine", "responses": ["a", "b"], "ranks": [0, 1]}
    for bad, message in (({"prompt": "q", "responses": ["a"], "ranks": [0]}, f"ranking 2 of {src} has fewer than 2 responses"),
                         ({"prompt": "q", "prompt_id": "q7", "responses": ["a"], "ranks": [0]},
                          f"ranking 2 of {src} (prompt_id 'q7') has fewer than 2 responses"),
                         ({"prompt": "q", "responses": ["a", "b"], "ranks": [0, 1], "annotator": "  "},
                          f"ranking 2 of {src}: annotator")):
        src.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
        code, text = run(["annotate", "import", str(src), "--db", f"sqlite:///{db_file}", "-p", "x", "-f", "kwise"], capsys)
        assert code == 2 and message in text and "kwise-" not in text and "Traceback" not in text, text
        assert len(text.strip().splitlines()) == 1, text
        assert _projects(db_file) == []


def test_a_directory_given_as_a_file_is_named_so(tmp_path, capsys, monkeypatch):
    """`align annotate import . ...` said "file not found: ."; a directory is named as one, in
    the words the other commands use, and nothing is created."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    db_file = tmp_path / "d.db"
    for argv, message in ((["annotate", "import", ".", "-p", "p", "-f", "prompts"], ". is a directory, not a file"),
                          (["annotate", "import", "folder", "-p", "p", "-f", "kwise"], "folder is a directory, not a file"),
                          (["annotate", "create-project", "p", "--guidelines", "folder"],
                           "--guidelines folder is a directory, not a file")):
        code, text = run([*argv, "--db", f"sqlite:///{db_file}"], capsys)
        assert code == 2 and text.strip() == f"error: {message}", text
        assert _projects(db_file) == []


def test_guidelines_not_utf8_exit_2(tmp_path, capsys):
    g = tmp_path / "g.md"
    g.write_bytes("Rank \xe9".encode("latin-1"))
    db_file = tmp_path / "c.db"
    code, text = run(["annotate", "create-project", "x", "--db", f"sqlite:///{db_file}", "--guidelines", str(g)], capsys)
    assert code == 2 and "not UTF-8" in text and len(text.strip().splitlines()) == 1, text
    assert _projects(db_file) == []


def test_export_into_missing_folder_or_onto_folder_exit_2(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'a.db'}"
    src = tmp_path / "trl.jsonl"
    src.write_text(json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) + "\n")
    ok(["annotate", "import", str(src), "--db", db, "-p", "t", "-f", "trl"], capsys)
    for out, word in ((tmp_path / "missing" / "x.jsonl", "does not exist"), (tmp_path, "is a folder")):
        code, text = run(["annotate", "export", "--db", db, "-p", "t", "-o", str(out)], capsys)
        assert code == 2 and word in text and len(text.strip().splitlines()) == 1, text
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "missing").exists()


def test_export_refuses_an_existing_out_without_force(tmp_path, capsys):
    """`align export` refuses an existing --out without --force, and so does this: a run
    trained on the file fingerprints it and could not resume after a silent replacement."""
    db = f"sqlite:///{tmp_path / 'a.db'}"
    src = tmp_path / "trl.jsonl"
    src.write_text(json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) + "\n")
    ok(["annotate", "import", str(src), "--db", db, "-p", "t", "-f", "trl"], capsys)
    out = tmp_path / "rankings.jsonl"
    out.write_text("trained on\n")
    code, text = run(["annotate", "export", "--db", db, "-p", "t", "-o", str(out)], capsys)
    assert code == 2 and f"{out} already exists" in text and "--force" in text, text
    assert len(text.strip().splitlines()) == 1 and "Traceback" not in text
    assert out.read_text() == "trained on\n" and not list(tmp_path.glob("*.tmp"))
    assert "1 kwise rows written" in ok(["annotate", "export", "--db", db, "-p", "t", "-o", str(out), "--force"], capsys)
    assert [r.responses for r in read_kwise(out)] == [["4", "5"]] and not list(tmp_path.glob("*.tmp"))


def test_cli_invite_for_a_project_makes_a_member(tmp_path, capsys):
    from annotation import services
    from annotation.db import open_db

    db = f"sqlite:///{tmp_path / 'i.db'}"
    ok(["annotate", "create-project", "team", "--db", db, "--k", "2"], capsys)
    link = ok(["annotate", "invite", "--db", db, "--project", "team"], capsys).strip()
    code, out = run(["annotate", "invite", "--db", db, "--project", "nope"], capsys)
    assert code == 2 and "nope" in out and "Traceback" not in out
    with open_db(db)() as s:
        user = services.accept_invite(s, link.rsplit("/", 1)[1], "new-annotator", "a quiet harbour at dusk")
        assert services.is_member(s, services.get_project(s, "team"), user)


def test_serve_takes_every_setting_as_key_value_and_refuses_an_unknown_one(tmp_path, capsys, monkeypatch):
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(app=app, **kwargs))
    db = f"sqlite:///{tmp_path / 's.db'}"
    ok(["annotate", "serve", "--db", db, "--max-body-kb", "8", "session_ttl_s=60", "login_max_failures=3"], capsys)
    settings = served["app"].state.settings
    assert (settings.db_url, settings.max_body_bytes, settings.session_ttl_s, settings.login_max_failures) == (
        db, 8 * 1024, 60.0, 3)
    served.clear()
    for argv, expected in ((["session_ttl=60"], "unknown config key 'session_ttl'"),
                           (["session_ttl_s=0"], "session_ttl_s"), (["max_in_flight=many"], "max_in_flight")):
        code, out = run(["annotate", "serve", "--db", db, *argv], capsys)
        assert code == 2 and expected in out and len(out.strip().splitlines()) == 1 and not served


def _one_line_refusal(code, text, word):
    assert code == 2 and word in text and "Traceback" not in text and len(text.strip().splitlines()) == 1, text


def test_export_never_writes_over_the_database_it_reads(tmp_path, capsys, monkeypatch):
    """--force replaces an earlier export, never the database itself or a file SQLite keeps beside it
    (named as it is, relative to the working directory, or through a link)."""
    db_file = tmp_path / "a.db"
    db = f"sqlite:///{db_file}"
    src = tmp_path / "trl.jsonl"
    src.write_text(json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) + "\n")
    ok(["annotate", "import", str(src), "--db", db, "-p", "t", "-f", "trl"], capsys)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link.db").symlink_to(db_file)
    for out in (str(db_file), "a.db", "link.db", "a.db-wal", "a.db.writer-lock"):
        code, text = run(["annotate", "export", "--db", db, "-p", "t", "-o", out, "--force"], capsys)
        _one_line_refusal(code, text, "is a file of the database the export reads")
    assert db_file.read_bytes().startswith(b"SQLite format 3\0") and (tmp_path / "a.db.writer-lock").stat().st_size == 0
    assert _projects(db_file) == ["t"] and not list(tmp_path.glob("*.tmp"))
    assert "1 kwise rows written" in ok(["annotate", "export", "--db", "sqlite:///a.db", "-p", "t", "-o", "x.jsonl"], capsys)


def test_a_file_that_is_no_database_is_one_line_and_left_as_it_was(tmp_path, capsys):
    """Nothing is made beside it either: not its writer lock (which is only ever made, never deleted)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n")
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_text("these are notes, not a database\n")
    for argv in (["import", str(prompts), "-p", "x", "-f", "prompts"], ["export", "-p", "x", "-o", str(tmp_path / "o.jsonl")]):
        code, text = run(["annotate", *argv, "--db", f"sqlite:///{not_a_db}"], capsys)
        _one_line_refusal(code, text, f"cannot open database sqlite:///{not_a_db}: file is not a database")
    assert not_a_db.read_text() == "these are notes, not a database\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "prompts.jsonl"]


def test_commands_that_only_read_refuse_a_database_that_is_not_there(tmp_path, capsys, monkeypatch):
    """A mistyped --db is named, not made into an empty database ("no project 'x'" followed);
    import still creates a new one."""
    monkeypatch.setenv("ALIGN_USER_PASSWORD", "a quiet harbour at dusk")
    typo = tmp_path / "anotation.db"
    for argv in (["export", "-p", "x", "-o", str(tmp_path / "o.jsonl")], ["token", "ann"], ["set-password", "ann"],
                 ["generate", "-p", "x"], ["invite", "-p", "x"]):  # (these two need the project there)
        code, text = run(["annotate", *argv, "--db", f"sqlite:///{typo}"], capsys)
        _one_line_refusal(code, text, f"database not found: {typo}")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.chdir(tmp_path)  # the default database, align-annotation.db here, is not there either
    _one_line_refusal(*run(["annotate", "export", "-p", "x", "-o", "o.jsonl"], capsys), "database not found")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n")
    assert "1 prompts" in ok(["annotate", "import", str(prompts), "--db", f"sqlite:///{typo}", "-p", "x", "-f", "prompts"], capsys)
    assert _projects(typo) == ["x"]


@pytest.mark.parametrize("url", ["mysql+nosuchdriver://ann:s3cret@127.0.0.1/x",  # SQLAlchemy parses it
                                 "postgresql+psycopg://ann:s3cret@127.0.0.1:port/x"])  # it does not
def test_database_messages_never_show_the_password(tmp_path, capsys, url):
    code, text = run(["annotate", "export", "--db", url, "-p", "x", "-o", str(tmp_path / "o.jsonl")], capsys)
    _one_line_refusal(code, text, "cannot use database")
    assert "s3cret" not in text and "ann:***@127.0.0.1" in text, text


def test_an_openassistant_tree_without_ranked_replies_says_so(tmp_path, capsys):
    """Not "the file is empty": the tree was read, and read_oasst keeps only ranked sibling replies."""
    db_file = tmp_path / "o.db"
    tree = {"prompt": {"message_id": "m1", "role": "prompter", "text": "hi", "replies": [
        {"message_id": "m2", "role": "assistant", "text": "hello", "rank": None, "replies": []}]}}
    path = tmp_path / "oasst.jsonl"
    path.write_text(json.dumps(tree) + "\n")
    code, text = run(["annotate", "import", str(path), "--db", f"sqlite:///{db_file}", "-p", "x", "-f", "oasst"], capsys)
    _one_line_refusal(code, text, f"{path}: no ranked replies: its message tree has no two sibling assistant replies")
    assert "empty" not in text and _projects(db_file) == []


def test_import_refuses_project_settings_an_existing_project_would_ignore(tmp_path, capsys):
    import sqlite3

    db_file = tmp_path / "a.db"
    db = f"sqlite:///{db_file}"
    first, second = tmp_path / "p1.jsonl", tmp_path / "p2.jsonl"
    first.write_text(json.dumps({"id": "a", "prompt": "one"}) + "\n")
    second.write_text(json.dumps({"id": "b", "prompt": "two"}) + "\n")
    ok(["annotate", "import", str(first), "--db", db, "-p", "P", "-f", "prompts", "--k", "4", "--annotators", "2"], capsys)
    code, text = run(["annotate", "import", str(second), "--db", db, "-p", "P", "-f", "prompts", "--k", "3"], capsys)
    assert code == 2 and text.strip() == ("error: project 'P' exists with k=4, not 3: k is set when an import creates a "
                                          "project (leave it out, or import into a new one)")
    code, text = run(["annotate", "import", str(second), "--db", db, "-p", "P", "-f", "prompts", "--annotators", "5"],
                     capsys)
    assert code == 2 and "exists with annotators_per_prompt=2, not 5" in text
    with sqlite3.connect(db_file) as con:
        assert con.execute("select source_id from prompts").fetchall() == [("a",)]  # nothing of the refused imports
    assert "1 prompts" in ok(["annotate", "import", str(second), "--db", db, "-p", "P", "-f", "prompts", "--k", "4"],
                             capsys)  # the project's own value is no conflict


def test_export_never_puts_a_file_in_place_of_a_link_or_a_pipe_even_with_force(tmp_path, capsys):
    import os

    db = f"sqlite:///{tmp_path / 'a.db'}"
    src = tmp_path / "trl.jsonl"
    src.write_text(json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) + "\n")
    ok(["annotate", "import", str(src), "--db", db, "-p", "t", "-f", "trl"], capsys)
    (tmp_path / "elsewhere").mkdir()
    kept = tmp_path / "elsewhere" / "kept.jsonl"
    kept.write_text("kept\n")
    link, pipe = tmp_path / "link.jsonl", tmp_path / "pipe"
    link.symlink_to(kept)
    os.mkfifo(pipe)
    for out, said in ((link, "is a symbolic link"), (pipe, "is not a regular file")):
        code, text = run(["annotate", "export", "--db", db, "-p", "t", "-o", str(out), "--force"], capsys)
        assert code == 2 and said in text and len(text.strip().splitlines()) == 1, text
    assert link.is_symlink() and kept.read_text() == "kept\n" and not pipe.is_file()
