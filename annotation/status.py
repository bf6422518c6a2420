"""The HTTP status each domain error of the service layer is answered with (API and pages alike)."""

from __future__ import annotations

from annotation import services

# Domain errors of the service layer -> HTTP status.
HTTP_STATUS = {
    services.Unauthorized: 401,
    services.NotFound: 404,
    services.Forbidden: 403,
    services.Conflict: 409,
    services.Invalid: 422,
    services.Throttled: 429,
    services.StorageFull: 507,
}


def http_status(exc: Exception) -> int:
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 400
