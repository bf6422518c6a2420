"""The annotation service layer: plain functions over a SQLAlchemy `Session`, by resource.

Routes are thin wrappers around these, and `align demo` calls them directly so simulated
annotators rank through the same code path as people in the browser. Every function that
changes data commits its own unit of work; errors are the domain errors of
`annotation.services.errors`, which the web layer maps to HTTP statuses and the CLI prints
as one line.

    users     accounts, API tokens, browser sessions, invites, throttled sign-in
    projects  projects and their members
    imports   adding prompts and candidates, importing files
    ranking_import  importing existing rankings (several per prompt)
    import_files  reading a file and importing it as prompts or rankings
    leasing   which prompt an annotator ranks next (tasks, leases, slots)
    rankings  submitting, revising and skipping rankings
    reports   exports, progress and the dashboard
"""

from align.errors import UserError
from annotation.services.errors import Conflict, Forbidden, Invalid, NotFound, ServiceError, StorageFull, Throttled, Unauthorized
from annotation.services.import_files import import_body, import_file
from annotation.services.imports import (
    IMPORT_FORMATS,
    MAX_TEXT,
    ImportReport,
    add_candidates,
    add_prompts,
    prompts_without_candidates,
    read_records,
)
from annotation.services.leasing import (
    Task,
    TaskCandidate,
    next_task,
    next_task_in,
    release_expired_leases,
    renew_lease,
)
from annotation.services.projects import (
    MAX_CANDIDATES,
    add_member,
    create_project,
    get_or_create_project,
    get_project,
    is_member,
    list_projects,
    members,
    project_for,
    remove_member,
)
from annotation.services.ranking_import import import_rankings
from annotation.services.rankings import (
    MAX_REASON,
    get_task,
    order_to_ranks,
    ranked_prefix,
    ranks_to_order,
    revise_ranking,
    skip_task,
    submit_ranking,
    validate_order,
)
from annotation.services.reports import (
    EXPORT_FORMATS,
    dashboard,
    export_format,
    export_rankings,
    export_rows,
    project_progress,
    prompt_detail,
    timeline,
    user_progress,
    write_export,
)
from annotation.services.users import (
    BearerToken,
    SessionCookie,
    accept_invite,
    as_user,
    authenticate,
    change_password,
    close_web_session,
    create_invite,
    create_user,
    get_user,
    issue_api_token,
    list_users,
    open_web_session,
    revoke_api_token,
    set_active,
    set_password,
    sign_in,
    source_username,
    user_for_session,
    user_for_token,
)

__all__ = [
    "BearerToken",
    "SessionCookie",
    "Conflict",
    "EXPORT_FORMATS",
    "Forbidden",
    "IMPORT_FORMATS",
    "ImportReport",
    "Invalid",
    "MAX_CANDIDATES",
    "MAX_REASON",
    "MAX_TEXT",
    "NotFound",
    "ServiceError",
    "Unauthorized",
    "Task",
    "TaskCandidate",
    "StorageFull",
    "Throttled",
    "UserError",
    "accept_invite",
    "add_candidates",
    "add_member",
    "add_prompts",
    "as_user",
    "authenticate",
    "close_web_session",
    "create_invite",
    "create_project",
    "create_user",
    "dashboard",
    "export_format",
    "export_rankings",
    "export_rows",
    "get_or_create_project",
    "get_project",
    "get_task",
    "get_user",
    "import_body",
    "import_file",
    "import_rankings",
    "is_member",
    "issue_api_token",
    "list_projects",
    "list_users",
    "members",
    "next_task",
    "next_task_in",
    "open_web_session",
    "order_to_ranks",
    "ranked_prefix",
    "project_for",
    "project_progress",
    "prompt_detail",
    "prompts_without_candidates",
    "ranks_to_order",
    "read_records",
    "release_expired_leases",
    "remove_member",
    "renew_lease",
    "revise_ranking",
    "revoke_api_token",
    "set_active",
    "change_password",
    "set_password",
    "sign_in",
    "source_username",
    "skip_task",
    "submit_ranking",
    "timeline",
    "user_for_session",
    "user_for_token",
    "user_progress",
    "validate_order",
    "write_export",
]
