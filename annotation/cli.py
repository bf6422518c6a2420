"""`align annotate ...` commands. Only typer and the standard library at module level:
FastAPI, SQLAlchemy and torch are imported inside the commands so `align --help` stays fast."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from align.errors import UserError

app = typer.Typer(no_args_is_help=True)

DbOpt = Annotated[
    str | None,
    typer.Option("--db", help="SQLAlchemy URL: sqlite:///file.db or postgresql+psycopg://user:pw@host/db "
                 "(default: align-annotation.db in the working directory)."),
]
ProjectOpt = Annotated[str, typer.Option("--project", "-p", help="Project name.")]


def _sessionmaker(db: str | None, *, create: bool = True):
    """The database of --db; `create` False for commands that only read it (a mistyped path is refused)."""
    from annotation.db import open_db

    return open_db(db, create=create)


def _password(env_var: str, prompt: str) -> str:
    """From the environment (scripts) or a hidden prompt; never a default."""
    pw = os.environ.get(env_var)
    if pw:
        return pw
    if not sys.stdin.isatty():
        raise UserError(f"no password: set {env_var} or run in a terminal to be asked")
    return typer.prompt(prompt, hide_input=True, confirmation_prompt=True)


def _proxy_addresses(value: str) -> str:
    """--forwarded-allow-ips, each entry an address or network as uvicorn reads it (or `*`):
    uvicorn takes anything else for a name no TCP client has, and trusts nobody by it."""
    import ipaddress

    for entry in (e.strip() for e in value.split(",")):
        if entry == "*":
            continue
        try:
            ipaddress.ip_network(entry) if "/" in entry else ipaddress.ip_address(entry)
        except ValueError as exc:
            raise UserError(f"--forwarded-allow-ips: {entry!r} is not an IP address or network ({exc}); e.g. "
                            "10.0.0.5 or 10.0.0.0/24, comma-separated") from None
    return value


def _log_level(value: str) -> str:
    """--log-level as uvicorn names it (its own refusal was a KeyError traceback)."""
    from uvicorn.config import LOG_LEVELS

    if value.lower() not in LOG_LEVELS:
        raise UserError(f"--log-level {value!r} is not a log level; choose one of {', '.join(LOG_LEVELS)}")
    return value.lower()


def _check_host(host: str) -> None:
    """--host must be an address of this machine (or a name for one): one of the addresses it
    resolves to is bound here on a port the system picks, as the server would bind it. uvicorn
    said so only after "Application startup complete", as a log line and exit 3."""
    import socket

    failure: OSError | ValueError | None = None
    try:  # one address that binds is enough: the server skips a family the kernel lacks (IPv6 off, ::1)
        for family, kind, proto, _name, address in socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM,
                                                                       flags=socket.AI_PASSIVE):
            try:
                with socket.socket(family, kind, proto) as probe:
                    probe.bind(address)
                return
            except OSError as exc:
                failure = failure or exc
    except (OSError, ValueError) as exc:  # (gaierror is an OSError; a NUL or bad IDNA name a ValueError)
        failure = exc
    reason = failure.strerror if isinstance(failure, OSError) and failure.strerror else failure
    raise UserError(f"--host {host}: cannot listen on it ({reason}); give an address of this machine "
                    "(127.0.0.1: this machine only, 0.0.0.0: every interface)") from None


def _settings_help() -> str:
    from align.cli_common import config_keys_help
    from annotation.settings import Settings

    return config_keys_help(Settings, "[bold]Settings[/bold] (as key=value after the options; the options above set "
                                      "the ones they name):")


@app.command("serve", epilog=_settings_help())
def serve(
    overrides: Annotated[list[str] | None, typer.Argument(help="Settings as key=value (listed below).",
                                                          show_default=False)] = None,
    db: DbOpt = None,
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0 to serve a team).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8000,
    max_body_kb: Annotated[int, typer.Option(help="Request size limit in KiB (imports: the max_import_bytes setting).", min=1)] = 1024,
    secure_cookies: Annotated[bool, typer.Option(help="Mark cookies Secure (when served over HTTPS).")] = False,
    log_level: Annotated[str, typer.Option(help="uvicorn log level: critical, error, warning, info, debug or trace.")] = "info",
    workers: Annotated[int, typer.Option(help="Worker processes: about one per core (SQLite too: writers queue on a lock, readers do not); the load figures in annotation/README.md use 3 on 2 cores, the database on the same machine.", min=1, max=64)] = 1,
    forwarded_allow_ips: Annotated[str | None, typer.Option(
        help="Behind a reverse proxy: the proxy's addresses (comma-separated; networks such as 10.0.0.0/8 too), "
             "whose X-Forwarded-For header then names each client. Sign-in limits count failures per client "
             "address too, 4 x login_max_failures (20) in login_window_s (5 minutes) for all accounts together: "
             "behind a proxy that is not trusted every request comes from its address, and 20 mistyped "
             "passwords lock the whole team out, admins included. Trust only your proxy (a trusted address "
             "can claim to be any client). Default: $FORWARDED_ALLOW_IPS, else 127.0.0.1,::1.",
        show_default=False)] = None,
) -> None:
    """Serve the annotation web app (schema created or migrated on start)."""
    import dataclasses
    import json

    import uvicorn

    from align.config import load_config
    from annotation.app import SETTINGS_ENV, served_app
    from annotation.db import default_db_url, make_engine, migrate
    from annotation.settings import Settings

    settings = load_config(Settings, None, overrides, base={"db_url": db or default_db_url(),
                                                            "max_body_bytes": max_body_kb * 1024,
                                                            "secure_cookies": secure_cookies})
    # uvicorn takes a client's address from X-Forwarded-For only from these (its own default without it)
    proxies = {} if forwarded_allow_ips is None else {"proxy_headers": True,
                                                      "forwarded_allow_ips": _proxy_addresses(forwarded_allow_ips)}
    log_level = _log_level(log_level)
    _check_host(host)
    # The database is opened (and refused, if it is not align's) before the server says it serves it
    engine = make_engine(settings.db_url)
    if engine.dialect.name == "postgresql":
        _check_connections(engine, workers, settings.db_connections)
    if workers == 1:
        engine.dispose()
        served = served_app(settings)
    else:
        migrate(engine)  # once, before the workers start (they would race to create the schema)
        engine.dispose()
    typer.echo(f"align annotate: serving {settings.db_url.split('@')[-1]} on http://{host}:{port}/"
               + (f" with {workers} workers" if workers > 1 else ""), err=True)
    if workers == 1:
        uvicorn.run(served, host=host, port=port, log_level=log_level, access_log=False, **proxies)
        return
    os.environ[SETTINGS_ENV] = json.dumps(dataclasses.asdict(settings))
    uvicorn.run("annotation.app:app_from_environment", factory=True, workers=workers, host=host, port=port,
                log_level=log_level, access_log=False, **proxies)


def _check_connections(engine, workers: int, db_connections: int) -> None:
    """The connections the workers will open as they start, against what the server allows (one
    line, exit 2, rather than workers dying one by one while the command exits 0)."""
    from sqlalchemy.exc import DBAPIError

    from annotation.db_guard import connections_problem

    try:
        with engine.connect() as conn:
            problem = connections_problem(conn, workers * db_connections,
                                          f"{workers} worker{'s' if workers > 1 else ''} x db_connections={db_connections}")
    except DBAPIError:
        return  # no server, no such database: migrate says so in its words
    finally:
        engine.dispose()
    if problem:
        raise UserError(problem)


@app.command("create-admin")
def create_admin(
    username: Annotated[str, typer.Argument(help="Admin user name.")],
    db: DbOpt = None,
) -> None:
    """Create an admin account. Password from $ALIGN_ADMIN_PASSWORD or asked (hidden)."""
    from annotation import services

    password = _password("ALIGN_ADMIN_PASSWORD", "Password")
    with _sessionmaker(db)() as s:
        services.create_user(s, username, password, "admin")
    typer.echo(f"admin {username!r} created")


@app.command("create-user")
def create_user(
    username: Annotated[str, typer.Argument(help="Annotator user name.")],
    db: DbOpt = None,
    admin: Annotated[bool, typer.Option("--admin", help="Give the account admin rights.")] = False,
    token: Annotated[bool, typer.Option("--token", help="Also print an API token for scripts.")] = False,
) -> None:
    """Create an annotator account. Password from $ALIGN_USER_PASSWORD or asked (hidden)."""
    from annotation import services

    password = _password("ALIGN_USER_PASSWORD", "Password")
    with _sessionmaker(db)() as s:
        user = services.create_user(s, username, password, "admin" if admin else "annotator")
        typer.echo(f"user {username!r} created")
        if token:
            typer.echo(services.issue_api_token(s, user))


@app.command("set-password")
def set_password(
    username: Annotated[str, typer.Argument(help="User name.")],
    db: DbOpt = None,
) -> None:
    """Give an account a new password (from $ALIGN_USER_PASSWORD or asked, hidden); for an
    account asked to change one made under an older rule, or one whose owner forgot it."""
    from annotation import services
    from annotation.services.users import imported_annotator_problem

    with _sessionmaker(db, create=False)() as s:  # a new database has no user to change
        user = services.get_user(s, username)
        problem = imported_annotator_problem(user, "password")
        if problem:  # said before a password is asked for
            raise UserError(problem)
        password = _password("ALIGN_USER_PASSWORD", "New password")
        services.set_password(s, user, password)
    typer.echo(f"password of {username!r} changed" + ("" if user.active else
               "; the account is deactivated: it signs in once an admin reactivates it"))


@app.command("invite")
def invite(
    db: DbOpt = None,
    base_url: Annotated[str, typer.Option(help="Where the app is served.")] = "http://127.0.0.1:8000",
    admin: Annotated[bool, typer.Option("--admin", help="The invited account is an admin.")] = False,
    project: Annotated[
        str | None, typer.Option("--project", "-p", help="The new account becomes a member of this project.")
    ] = None,
) -> None:
    """Print a one-use invite link (7 days) with which a person picks their own password."""
    from annotation import services

    with _sessionmaker(db, create=project is None)() as s:  # (a first admin's invite may start a database)
        target = services.get_project(s, project) if project is not None else None
        token = services.create_invite(s, "admin" if admin else "annotator", project=target)
    typer.echo(f"{base_url.rstrip('/')}/invite/{token}")


@app.command("token")
def token(username: Annotated[str, typer.Argument(help="Existing user.")], db: DbOpt = None) -> None:
    """Print a new API token for a user (send as 'Authorization: Bearer TOKEN'); not for a
    deactivated account, nor an imported annotator's."""
    from annotation import services
    from annotation.services.users import token_problem

    with _sessionmaker(db, create=False)() as s:  # a new database has no user
        user = services.get_user(s, username)
        problem = token_problem(user)
        if problem:
            raise UserError(problem)
        typer.echo(services.issue_api_token(s, user))


@app.command("create-project")
def create_project(
    name: Annotated[str, typer.Argument(help="Project name.")],
    db: DbOpt = None,
    k: Annotated[int, typer.Option(help="Candidates per prompt.", min=2, max=16)] = 4,
    annotators_per_prompt: Annotated[int, typer.Option("--annotators-per-prompt", "--annotators",
                                                       help="Distinct annotators per prompt.", min=1, max=100)] = 1,
    guidelines: Annotated[Path | None, typer.Option(help="Markdown file with the annotation guidelines.")] = None,
    lease_seconds: Annotated[int, typer.Option(help="How long an opened task is held for its annotator.", min=10)] = 900,
    rank_top: Annotated[int | None, typer.Option(
        help="Top-m: annotators rank only the best M candidates (1 <= M < K); the rest stay unordered below.",
        min=1, max=15)] = None,
) -> None:
    """Create an empty project."""
    from annotation import services

    text = ""
    if guidelines is not None:
        if guidelines.is_dir():
            raise UserError(f"--guidelines {guidelines} is a directory, not a file")
        if not guidelines.is_file():
            raise UserError(f"guidelines file not found: {guidelines}")
        try:
            text = guidelines.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"{guidelines}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
        except OSError as exc:
            raise UserError(f"{guidelines}: cannot be read ({exc.strerror or exc})") from None
    with _sessionmaker(db)() as s:
        services.create_project(s, name, k=k, annotators_per_prompt=annotators_per_prompt, guidelines=text,
                                lease_seconds=lease_seconds, rank_top=rank_top)
    typer.echo(f"project {name!r} created")


@app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(help="JSONL file (.gz accepted).")],
    project: ProjectOpt,
    format: Annotated[str, typer.Option("--format", "-f", help="oasst | hh | trl | prompts (with or without candidates) | kwise")],
    db: DbOpt = None,
    annotators_per_prompt: Annotated[int | None, typer.Option(
        "--annotators-per-prompt", "--annotators", help="Annotators per prompt, if the project is created.", min=1)] = None,
    k: Annotated[int | None, typer.Option(help="Candidates per prompt, if the project is created (default: from the file, else 4).", min=2, max=16)] = None,
) -> None:
    """Import prompts or existing preference data into a project (created if missing).
    Re-importing a file adds nothing twice."""
    from align.files import input_file_problem
    from annotation import services

    problem = input_file_problem(file)
    if problem:
        raise UserError(problem)
    extra = {"annotators_per_prompt": annotators_per_prompt} if annotators_per_prompt else {}
    if k is not None:
        extra["k"] = k
    with _sessionmaker(db)() as s:
        r = services.import_file(s, project, format, file, **extra)
    typer.echo(f"{project}: {r.prompts_added} prompts, {r.candidates_added} candidates, "
               f"{r.rankings_added} rankings imported; {r.duplicates_skipped} already present")


@app.command("export")
def export(
    project: ProjectOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output JSONL file (gzip-compressed if named .gz).")],
    format: Annotated[str, typer.Option("--format", "-f", help="kwise | trl (chosen/rejected pairs; also read as pairs) | hh")] = "kwise",
    all_revisions: Annotated[bool, typer.Option("--all-revisions", help="Every stored revision of every ranking "
                                                "(kwise only), not only the latest.")] = False,
    force: Annotated[bool, typer.Option(help="Replace --out if it already exists.")] = False,
    db: DbOpt = None,
) -> None:
    """Export rankings: kwise (one line per annotator and prompt, ties kept), trl (pairs), hh."""

    from annotation import services

    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name (e.g. {out / (project + '.jsonl')})")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    from annotation.db import default_db_url
    from annotation.db_url import sqlite_files

    database_files = sqlite_files(db or default_db_url())
    if out.resolve() in database_files:  # --force would replace the database
        raise UserError(f"--out {out} is a file of the database the export reads ({database_files[0]}); "
                        "choose another --out")
    services.export_format(format, all_revisions)  # a mistake in the request first
    from align.files import check_output_file

    check_output_file(out, force)  # without --force: a run trained on it resumes only from the same file
    with _sessionmaker(db, create=False)() as s:
        try:  # written as read: the rows of the whole project are never held at once
            written, notes = services.write_export(s, services.get_project(s, project), format, out,
                                                   all_revisions=all_revisions)
        except OSError as exc:
            raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    typer.echo(f"{written} {format} rows written to {out}")
    for note in notes:  # what the format could not hold (hh: system messages, turn markers in a prompt)
        typer.echo(note, err=True)


@app.command("generate")
def generate(
    project: ProjectOpt,
    model: Annotated[str, typer.Option(help="SFT checkpoint directory, or demo | demo:tiny | demo:small.")] = "demo",
    k: Annotated[int | None, typer.Option(help="Candidates to sample per prompt (default: the project's K).", min=2, max=16)] = None,
    db: DbOpt = None,
    response_length: Annotated[int, typer.Option("--response-length", "--max-new-tokens",
                                                 help="Length limit of each candidate, in tokens.", min=1)] = 48,
    temperature: Annotated[float, typer.Option(help="Sampling temperature, above 0 (the K candidates are sampled).")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: above 0, at most 1 (1: the whole vocabulary).")] = 1.0,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    seed: Annotated[int, typer.Option(min=0, max=2**31 - 1)] = 0,
) -> None:
    """Sample K candidates for every prompt of the project that has none yet."""
    import math

    from annotation import services
    from annotation.generate import generate_candidates

    # K different candidates need sampling: temperature 0 (greedy) failed inside transformers
    # after the model loaded, and top_p 0 kept one token, so that the K candidates were the same
    if not (math.isfinite(temperature) and temperature > 0):
        raise UserError(f"--temperature must be a finite number above 0 (the K candidates of a prompt are sampled), "
                        f"got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be above 0 and at most 1 (the K candidates of a prompt are sampled), got {top_p}")
    notes: list[str] = []
    with _sessionmaker(db, create=False)() as s:  # its project is there already
        pk = services.get_project(s, project).k
        n = generate_candidates(s, project, model, k=k, max_new_tokens=response_length, temperature=temperature,
                                top_p=top_p, batch_size=batch_size, seed=seed, progress=True, notes=notes)
    typer.echo(f"{project}: {pk * n} candidates generated ({pk} for each of {n} prompt{'s' if n != 1 else ''})" if n
               else f"{project}: no prompt is without its {pk} candidates; nothing generated")
    for note in notes:
        typer.echo(note, err=True)
