"""Accounts from the CLI, and sign-in limits behind a reverse proxy: `token` and
`set-password` refuse what would let nobody in; `serve --forwarded-allow-ips` trusts a proxy
so that each client behind it is counted on its own."""

from __future__ import annotations

import pytest

from annotation.devserver import PASSWORD
from tests.annotation.cli_runs import run_cli as _run


@pytest.fixture
def accounts(tmp_path):
    """A database with an active annotator, a deactivated one and an imported annotator."""
    from sqlalchemy import update

    from annotation import services
    from annotation.db import open_db
    from annotation.models import User

    db = f"sqlite:///{tmp_path / 'u.db'}"
    sm = open_db(db)
    with sm() as s:
        services.create_user(s, "ann", PASSWORD)
        gone = services.create_user(s, "gone", PASSWORD)
        s.execute(update(User).where(User.id == gone.id).values(active=False))
        services.create_user(s, services.source_username("u1"), None, "source")
        s.commit()
    yield db, sm
    sm.kw["bind"].dispose()


def _credentials(sm) -> tuple[int, list]:
    from sqlalchemy import func, select

    from annotation.models import ApiToken, User

    with sm() as s:
        return (s.scalar(select(func.count()).select_from(ApiToken)),
                s.execute(select(User.username, User.password_hash).order_by(User.id)).all())


def test_token_and_set_password_refuse_accounts_nobody_signs_in_with(accounts, capsys, monkeypatch):
    """A deactivated user's token (rc 0) was refused by every request; an imported
    annotator's worked; `set-password src:u1` said "password changed" and sign-in still
    refused it. Each is now one line, exit 2, nothing stored."""
    from annotation import services

    db, sm = accounts
    monkeypatch.setenv("ALIGN_USER_PASSWORD", "a new annotator password")
    before = _credentials(sm)
    for argv, words in ((["token", "gone"], "'gone' is deactivated: every request would refuse its token"),
                        (["token", "src:u1"], "'src:u1' is an imported annotator"),
                        (["set-password", "src:u1"], "'src:u1' is an imported annotator")):
        code, text = _run(["annotate", *argv, "--db", db], capsys)
        assert code == 2 and words in text and len(text.strip().splitlines()) == 1 and "Traceback" not in text, text
        assert _credentials(sm) == before
    monkeypatch.delenv("ALIGN_USER_PASSWORD")  # refused before a password is asked for
    assert "imported annotator" in _run(["annotate", "set-password", "src:u1", "--db", db], capsys)[1]

    code, text = _run(["annotate", "token", "ann", "--db", db], capsys)
    assert code == 0 and text.startswith("aln_")
    with sm() as s:
        assert services.user_for_token(s, text.strip()).username == "ann"
    monkeypatch.setenv("ALIGN_USER_PASSWORD", "a new annotator password")
    code, text = _run(["annotate", "set-password", "gone", "--db", db], capsys)  # kept for when it is reactivated
    assert code == 0 and "the account is deactivated: it signs in once an admin reactivates it" in text, text
    with sm() as s:
        services.set_active(s, "gone", True)
        assert services.sign_in(s, "gone", "a new annotator password", "10.0.0.1") is not None
        with pytest.raises(services.Forbidden, match="imported annotator"):
            services.set_password(s, services.get_user(s, "src:u1"), "a new annotator password")


def test_the_per_address_sign_in_limit_says_it_is_per_address_and_a_trusted_proxy_splits_it(env):
    """Four annotators behind one address mistype their passwords five times each: the
    address's limit (20, all accounts together) holds the fifth annotator and the admin
    too, and the 429 says the limit is the address's. Behind a trusted proxy (uvicorn's
    ProxyHeadersMiddleware, which `serve --forwarded-allow-ips` turns on for the proxy)
    the client is the address the proxy names, not the proxy's."""
    from fastapi.testclient import TestClient
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    from annotation import services
    from annotation.services import users

    with env.db() as db:
        for name in ("a1", "a2", "a3", "a4", "a5"):
            services.create_user(db, name, PASSWORD)
        for name in ("a1", "a2", "a3", "a4"):
            for _ in range(5):
                users.reserve_sign_in(db, name, "testclient")  # a failed sign-in (the attempt is never given back)
    for name in ("a5", "admin"):
        r = env.client.post("/api/tokens", json={"username": name, "password": PASSWORD})
        assert r.status_code == 429 and "from this network address (a limit per address" in r.json()["detail"], r.text
    proxied = TestClient(ProxyHeadersMiddleware(env.client.app, trusted_hosts="testclient"), base_url="http://127.0.0.1")
    r = proxied.post("/api/tokens", headers={"X-Forwarded-For": "192.0.2.15"}, json={"username": "a5", "password": PASSWORD})
    assert r.status_code == 201, r.text


def test_serve_hands_the_trusted_proxies_to_uvicorn_and_refuses_an_address_it_would_misread(tmp_path, capsys,
                                                                                           monkeypatch):
    import uvicorn

    from annotation.app import SETTINGS_ENV

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    monkeypatch.setenv(SETTINGS_ENV, "")  # --workers 2 sets it for its workers; put back after the test
    db = f"sqlite:///{tmp_path / 's.db'}"
    for workers in ("1", "2"):
        code, text = _run(["annotate", "serve", "--db", db, "--workers", workers,
                           "--forwarded-allow-ips", "10.0.0.5, 10.1.0.0/16"], capsys)
        assert code == 0, text
        assert calls.pop()["forwarded_allow_ips"] == "10.0.0.5, 10.1.0.0/16"
    assert _run(["annotate", "serve", "--db", db], capsys)[0] == 0
    assert "forwarded_allow_ips" not in calls.pop()  # uvicorn's default: 127.0.0.1 and ::1
    for wrong in ("proxy.example.org", "10.0.0.5/16", "10.0.0.300"):
        code, text = _run(["annotate", "serve", "--db", db, "--forwarded-allow-ips", wrong], capsys)
        assert code == 2 and "--forwarded-allow-ips" in text and len(text.strip().splitlines()) == 1, text
    assert not calls
    monkeypatch.setenv("COLUMNS", "300")
    assert "--forwarded-allow-ips" in _run(["annotate", "serve", "--help"], capsys)[1]
