"""The admin's People page of a project (`/admin/projects/{p}/people`): its invite links (make,
list, revoke) and its members (list, add an existing user, remove, deactivate or reactivate an
account). Every form posts, changes through the service functions the JSON API calls, and
redirects back to the page (post/redirect/get), so a reload or Back never sends a form again;
a refusal is the page again with the error and the service error's 4xx, nothing changed."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Form, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from annotation import services
from annotation.deps import AdminUser, SessionDep
from annotation.limits import MAX_DB_INT
from annotation.models import User
from annotation.routes_web import page
from annotation.services import users
from annotation.status import http_status

router = APIRouter(include_in_schema=False)

# A new invite link goes from the POST that made it to the page that shows it in this cookie,
# not in the address (which browsers keep in their history and servers in their logs). Only the
# invite's hash is stored, so the page shows a link once, read from the cookie and cleared.
NEW_INVITE_COOKIE = "align_new_invite"
NEW_INVITE_MAX_AGE_S = 120
# What a form that redirects to the page says there (`?done=KEY`): fixed words, never the query's text
DONE_NOTICES = {"invite-revoked": "Invite revoked: its link no longer works.",
                "member-added": "Member added.", "member-removed": "Member removed; their open task here went back.",
                "deactivated": "Account deactivated: signed out everywhere, its open tasks went back.",
                "activated": "Account reactivated."}


def people_path(name: str) -> str:
    return f"/admin/projects/{quote(name, safe='')}/people"


def _people_page(request: Request, db, user: User, name: str, status_code: int = 200, *,
                 error: str | None = None, notice: str | None = None, new_link: str | None = None,
                 username: str = "") -> HTMLResponse:
    p = services.get_project(db, name)
    members = [{"u": m, "done": services.user_progress(db, m, p)["done"]} for m in services.members(db, p)]
    return page(request, "people.html", status_code=status_code, user=user, project=p, members=members,
                invites=users.live_invites(db, p), error=error, notice=notice, new_link=new_link, username=username,
                dashboard=f"/admin/projects/{quote(name, safe='')}", here=people_path(name), quote=quote)


def _back(name: str, done: str) -> RedirectResponse:
    return RedirectResponse(f"{people_path(name)}?done={done}", status_code=303)


@router.get("/admin/projects/{name}/people", response_class=HTMLResponse)
def people_page(name: str, request: Request, db: SessionDep, user: AdminUser, done: str | None = None):
    new_link, token = None, request.cookies.get(NEW_INVITE_COOKIE)
    if token:  # shown only if it is a live invite to this project (a cookie is whatever the browser sends)
        inv = users.find_invite(db, token)
        p = services.get_project(db, name)
        if inv is not None and users.invite_problem(inv) is None and inv.project_id == p.id:
            new_link = str(request.base_url).rstrip("/") + "/invite/" + token
    resp = _people_page(request, db, user, name, notice=DONE_NOTICES.get(done or ""), new_link=new_link)
    if token:
        resp.delete_cookie(NEW_INVITE_COOKIE, path=people_path(name), httponly=True, samesite="strict")
    return resp


@router.post("/admin/projects/{name}/invite")
def invite_create(name: str, request: Request, db: SessionDep, _admin: AdminUser) -> Response:
    token = services.create_invite(db, "annotator", project=services.get_project(db, name))
    resp = RedirectResponse(people_path(name) + "#new-invite", status_code=303)
    resp.set_cookie(NEW_INVITE_COOKIE, token, max_age=NEW_INVITE_MAX_AGE_S, path=people_path(name), httponly=True,
                    samesite="strict", secure=request.app.state.settings.secure_cookies)
    return resp


@router.post("/admin/projects/{name}/invites/{invite_id}/revoke")
def invite_revoke(name: str, invite_id: Annotated[int, Path(ge=1, le=MAX_DB_INT)], request: Request,
                  db: SessionDep, user: AdminUser) -> Response:
    if not users.revoke_invite(db, services.get_project(db, name), invite_id):
        return _people_page(request, db, user, name, 404, error="No such open invite: it was used, revoked or "
                                                                "has expired.")
    return _back(name, "invite-revoked")


@router.post("/admin/projects/{name}/members")
def member_add(name: str, request: Request, db: SessionDep, user: AdminUser,
               username: Annotated[str, Form(max_length=200)] = "") -> Response:
    username = username.strip()
    try:
        p = services.get_project(db, name)
        if not username:
            raise services.Invalid("Enter the username of an existing account.")
        if not services.add_member(db, p, services.get_user(db, username)):
            raise services.Conflict(f"{username!r} is already a member of {name!r}")
    except services.ServiceError as exc:
        return _people_page(request, db, user, name, http_status(exc), error=str(exc), username=username)
    return _back(name, "member-added")


@router.post("/admin/projects/{name}/members/{username}/remove")
def member_remove(name: str, username: str, request: Request, db: SessionDep, user: AdminUser) -> Response:
    try:
        if not services.remove_member(db, services.get_project(db, name), services.get_user(db, username)):
            raise services.NotFound(f"{username!r} is not a member of {name!r}")
    except services.ServiceError as exc:
        return _people_page(request, db, user, name, http_status(exc), error=str(exc))
    return _back(name, "member-removed")


@router.post("/admin/projects/{name}/people/{username}/{action}")
def account_active(name: str, username: str, action: Literal["deactivate", "activate"], request: Request,
                   db: SessionDep, user: AdminUser) -> Response:
    """Deactivate or reactivate an account (everywhere: an account is not the project's)."""
    try:
        services.get_project(db, name)  # the page to come back to exists before anything changes
        services.set_active(db, username, action == "activate", by=user)
    except services.ServiceError as exc:
        return _people_page(request, db, user, name, http_status(exc), error=str(exc))
    return _back(name, action + "d")
