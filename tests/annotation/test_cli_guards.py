"""What `align annotate` refuses before it does anything (another application's database, a log
level or host the server cannot use), what it writes (a .gz export), and what it leaves
running (nothing of an API import once the server is killed)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from tests.annotation.cli_runs import run_cli


def _one_line_refusal(code, text, *words):
    assert code == 2 and "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    for word in words:
        assert word in text, text


def _other_application_db(path, tables=("users",)) -> str:
    """A SQLite file of another application (a `users` table with a row, as its own); its sha256."""
    with sqlite3.connect(path) as con:
        for table in tables:
            con.execute(f"create table {table}(x)")
            con.execute(f"insert into {table} values (1)")
    con.close()
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("argv", [
    ["import", "{good}", "-p", "p", "-f", "kwise"],
    ["export", "-p", "p", "-o", "{out}"],
    ["create-user", "bob"],
    ["create-project", "p"],
    ["invite"],
    ["serve"],
], ids=lambda argv: argv[0])
def test_another_applications_database_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch, argv):
    """Not align's tables created beside its own, then a traceback (`no such column: users.id`), or an
    account written into it: one line naming the file and its tables, the file as it was, nothing
    made beside it (SQLite's WAL files, align's writer lock), not even the switch to WAL mode."""
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("served another application's database"))
    monkeypatch.setenv("ALIGN_USER_PASSWORD", "a quiet harbour at dusk")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "x", "prompt_id": "1", "responses": ["a", "b"], "ranks": [0, 1]}) + "\n")
    db_file = tmp_path / "a.db"
    before = _other_application_db(db_file)
    argv = [a.format(good=good, out=tmp_path / "o.jsonl") for a in argv]
    code, text = run_cli(["annotate", *argv, "--db", f"sqlite:///{db_file}"], capsys)
    _one_line_refusal(code, text, f"{db_file} is not an align annotation database", "tables: users")
    assert hashlib.sha256(db_file.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.db", "good.jsonl"]


def test_the_check_holds_under_the_migration_lock_too(tmp_path, monkeypatch):
    """The same refusal where the read-only look before the first connection saw nothing (a file
    made meanwhile; PostgreSQL, which has only this one): no align table is created in it."""
    from align.errors import UserError
    from annotation import db as annotation_db

    db_file = tmp_path / "a.db"
    _other_application_db(db_file, tables=[f"t{i:02d}" for i in range(10)])
    monkeypatch.setattr(annotation_db, "refuse_foreign_sqlite_file", lambda path: None)
    with pytest.raises(UserError, match=r"t00, t01, .*, t07 and 2 more"):
        annotation_db.open_db(f"sqlite:///{db_file}")
    with sqlite3.connect(db_file) as con:
        assert sorted(r[0] for r in con.execute("select name from sqlite_master where type = 'table'")) == [
            f"t{i:02d}" for i in range(10)]
    con.close()


def test_empty_new_and_align_databases_still_open(tmp_path, capsys):
    """An empty file and a new one are made align databases; align's own opens again, also while
    another process has it open in WAL mode (the read-only look must not refuse or block it)."""
    from annotation.db import begin_read_only, open_db

    (tmp_path / "empty.db").write_bytes(b"")
    for name in ("empty.db", "new.db"):
        url = f"sqlite:///{tmp_path / name}"
        assert run_cli(["annotate", "create-project", "p", "--db", url], capsys) == (0, "project 'p' created\n")
        held = open_db(url)()  # another connection reading it, as a server's
        begin_read_only(held)
        assert run_cli(["annotate", "create-project", "q", "--db", url], capsys) == (0, "project 'q' created\n")
        held.close()
        held.get_bind().dispose()


@pytest.mark.parametrize("option,value,words", [
    ("--log-level", "shouty", ["--log-level 'shouty' is not a log level", "critical, error, warning, info, debug, trace"]),
    ("--host", "999.1.1.1", ["--host 999.1.1.1: cannot listen on it"]),
    ("--host", "192.0.2.1", ["--host 192.0.2.1: cannot listen on it"]),  # TEST-NET-1: no machine's own address
])
def test_serve_refuses_a_log_level_or_host_it_cannot_use_before_it_starts(tmp_path, capsys, monkeypatch, option,
                                                                          value, words):
    """Not a KeyError traceback from uvicorn, nor its error after "Application startup complete" with
    exit 3: one line, exit 2, before the database is opened."""
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: served.append(a))
    db_file = tmp_path / "s.db"
    code, text = run_cli(["annotate", "serve", "--db", f"sqlite:///{db_file}", option, value], capsys)
    _one_line_refusal(code, text, *words)
    assert not served and not db_file.exists()
    code, _text = run_cli(["annotate", "serve", "--db", f"sqlite:///{db_file}", "--log-level", "WARNING",
                           "--host", "localhost"], capsys)
    assert code == 0 and len(served) == 1


def test_an_export_named_gz_is_gzip_and_reads_back_as_the_plain_one(tmp_path, capsys):
    """Plain text under a .gz name was read back by every reader as a damaged gzip file."""
    from align.formats import read_kwise

    db = f"sqlite:///{tmp_path / 'a.db'}"
    src = tmp_path / "trl.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"{i}+{i}?", "chosen": str(2 * i), "rejected": "5 \u00e9"}) + "\n"
                           for i in range(3)))
    assert run_cli(["annotate", "import", str(src), "--db", db, "-p", "t", "-f", "trl"], capsys)[0] == 0
    for name in ("r.jsonl", "r.jsonl.gz"):
        code, text = run_cli(["annotate", "export", "--db", db, "-p", "t", "-o", str(tmp_path / name)], capsys)
        assert code == 0 and "3 kwise rows written" in text, text
    plain, packed = tmp_path / "r.jsonl", tmp_path / "r.jsonl.gz"
    assert gzip.decompress(packed.read_bytes()) == plain.read_bytes()
    assert read_kwise(packed) == read_kwise(plain) and len(read_kwise(plain)) == 3
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".r.jsonl")]  # no temporary file left
    code, text = run_cli(["annotate", "import", str(packed), "--db", db, "-p", "back", "-f", "kwise"], capsys)
    assert code == 0 and "3 rankings imported" in text, text


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan may wait for a reaper that does not reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _holds_file(pid: int, path: str) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == path for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def _wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_an_api_import_process_ends_when_the_server_is_killed(tmp_path):
    """The server's import process (annotation.offload through anyio.to_process), waiting for the
    writer lock that this test holds, is gone at once when its server is SIGKILLed: left orphaned,
    it took the lock once free and imported into the database for seconds after the server died."""
    import fcntl

    from annotation.db import open_db
    from annotation.devserver import REPO

    db_file = tmp_path / "a.db"
    open_db(f"sqlite:///{db_file}").kw["bind"].dispose()
    lock = os.open(f"{db_file}.writer-lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # every write of the import waits for it
    body = json.dumps({"prompt": "late?", "id": "l0", "candidates": ["a", "b"]}) + "\n"
    script = ("import anyio, anyio.to_process\n"
              "from annotation.offload import import_body_at\n"
              f"anyio.run(anyio.to_process.run_sync, import_body_at, {f'sqlite:///{db_file}'!r}, 'p', 'prompts', "
              f"{body.encode()!r})\n")
    server = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    workers: list[int] = []

    def waiting_for_the_lock() -> bool:
        workers[:] = _children(server.pid)
        return any(_holds_file(pid, f"{db_file}.writer-lock") for pid in workers)

    try:
        assert _wait_for(waiting_for_the_lock, 60), "the import process never reached the writer lock"
        server.kill()
        server.wait()
        assert _wait_for(lambda: not any(_running(pid) for pid in workers), 10), "the import process outlived its server"
    finally:
        server.kill()
        server.wait()
        for pid in workers:
            if _running(pid):
                os.kill(pid, 9)
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)


def test_a_host_with_one_address_that_listens_is_served(monkeypatch):
    # localhost resolving to ::1 too, on a kernel without IPv6: the server binds 127.0.0.1 and serves
    import socket

    from align.errors import UserError
    from annotation.cli import _check_host

    def addresses(host, *args, **kwargs):
        both = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 0)),  # not this machine's
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]
        return both if host == "both" else both[:1]

    monkeypatch.setattr(socket, "getaddrinfo", addresses)
    _check_host("both")
    with pytest.raises(UserError, match=r"^--host only-not-here: cannot listen on it \(Cannot assign requested address\)"):
        _check_host("only-not-here")


def test_a_postgis_database_s_own_table_is_not_another_application_s(tmp_path):
    from sqlalchemy import create_engine, text

    from annotation.db_guard import foreign_tables

    engine = create_engine(f"sqlite:///{tmp_path / 'g.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE spatial_ref_sys (srid INTEGER)"))
        assert foreign_tables(conn) == []
        conn.execute(text("CREATE TABLE users (x)"))
        assert foreign_tables(conn) == ["users"]
    engine.dispose()


def test_serve_refuses_more_postgresql_connections_than_the_server_allows(capsys, monkeypatch):
    """Each worker opens all its db_connections as it starts: past what the server allows, the workers
    died one by one with pages of tracebacks and the command exited 0. One line, exit 2, no server."""
    from tests.annotation.conftest import PG_URL

    if not PG_URL:
        pytest.skip("ALIGN_TEST_DATABASE_URL not set (source .ci/services.sh to run on PostgreSQL)")
    import uvicorn
    from sqlalchemy import create_engine, text

    engine = create_engine(PG_URL)
    with engine.connect() as conn:
        allowed = conn.execute(text("SELECT current_setting('max_connections')::int")).scalar_one()
    engine.dispose()
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: served.append(a))
    code, text_ = run_cli(["annotate", "serve", "--db", PG_URL, "--workers", "2", f"db_connections={allowed}"], capsys)
    _one_line_refusal(code, text_, f"2 workers x db_connections={allowed} ask PostgreSQL for {2 * allowed} connections",
                      "lower --workers or db_connections")
    assert not served
    code, _ = run_cli(["annotate", "serve", "--db", PG_URL, "db_connections=2"], capsys)
    assert code == 0 and len(served) == 1


def test_a_database_user_that_may_not_create_tables_is_told_what_to_grant(tmp_path):
    """PostgreSQL 15 lets only a database's owner create tables in `public`: its refusal (SQLSTATE
    42501) reached the user as a traceback with the SQL in it."""
    from sqlalchemy.exc import ProgrammingError

    from align.errors import UserError
    from annotation.db_guard import creating_tables

    class Refusal(Exception):
        sqlstate = "42501"

        def __str__(self) -> str:
            return "permission denied for schema public\nLINE 2: CREATE TABLE users"

    with pytest.raises(UserError, match=r"^postgresql://u@h/db: permission denied for schema public; align creates "
                                        r"and migrates its own tables there: make the --db user the database's owner"):
        with creating_tables("postgresql://u@h/db"):
            raise ProgrammingError("CREATE TABLE users (...)", {}, Refusal())
    with pytest.raises(ProgrammingError):  # another refusal is not this one
        with creating_tables("postgresql://u@h/db"):
            raise ProgrammingError("SELECT", {}, Exception("syntax error"))
