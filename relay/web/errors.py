"""One shape for every error the web side answers: `{"error": code, "message": ...}`.

`message` is written for the person reading it: what was wrong and what to do. `field`
names the request field at fault when there is one (the API's 4xx on a bad submission).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

_CLASSES: dict[int, type[web.HTTPException]] = {
    cls.status_code: cls
    for cls in (
        web.HTTPBadRequest,
        web.HTTPUnauthorized,
        web.HTTPForbidden,
        web.HTTPNotFound,
        web.HTTPMethodNotAllowed,
        web.HTTPConflict,
        web.HTTPRequestEntityTooLarge,
        web.HTTPUnsupportedMediaType,
        web.HTTPUnprocessableEntity,
        web.HTTPTooManyRequests,
        web.HTTPServiceUnavailable,
    )
}


def error_body(code: str, message: str, **extra: Any) -> str:
    return json.dumps({"error": code, "message": message, **extra})


def json_error(
    status: int, code: str, message: str, *, bearer: bool = False, **extra: Any
) -> web.Response:
    """An error response; `bearer` adds the WWW-Authenticate challenge a 401 should carry."""
    response = web.json_response(text=error_body(code, message, **extra), status=status)
    if bearer:
        response.headers["WWW-Authenticate"] = 'Bearer realm="relay"'
    return response


def http_error(
    status: int, code: str, message: str, *, bearer: bool = False, **extra: Any
) -> web.HTTPException:
    """The same error as an exception, to raise from any depth of a handler."""
    headers = {"WWW-Authenticate": 'Bearer realm="relay"'} if bearer else None
    return _CLASSES[status](
        text=error_body(code, message, **extra), content_type="application/json", headers=headers
    )
