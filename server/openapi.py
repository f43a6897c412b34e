"""The OpenAPI document (``/openapi.json``, ``/docs``): auth, every error of every operation,
and the frame bodies.

FastAPI documents a route's success answer and a 422 of its own shape; the rest is added
here, from two sources:

- each route's decorator names the errors its body raises, as classes:
  ``responses=errors(NotFoundError, ValidationError)``. A frame route spreads
  ``**frames(CallRequest, CallReply, StateNotFoundError, ...)``, which also documents its
  request and its 200 answer as ``application/vnd.statehost.frame`` binaries;
- :func:`install_openapi` (FastAPI's ``app.openapi = custom`` recipe) adds what each
  route's dependencies answer (``require_token``: the ``bearerAuth`` scheme, 401, 403;
  ``read_frame``: 400, 413, 415; a JSON body FastAPI parses: 400), gives every error,
  FastAPI's 422 included, the one error body (component ``Error``), and puts the pattern
  of ``names.check_name`` on the parameters that are names.

A status and its meaning come from ``statehost.wire.ERROR_KINDS`` through the class, so
a route's errors are written once, as classes, never as numbers.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import fastapi.routing
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from statehost.server.deps import read_frame, require_submit, require_token
from statehost.server.errors import (
    ApiError,
    AuthError,
    ForbiddenError,
    PayloadTooLargeError,
    ProtocolError,
    UnsupportedMediaTypeError,
    ValidationError,
    VersionMismatchError,
)
from statehost.server.names import NAME_PATTERN
from statehost.wire import CONTENT_TYPE, ERROR_KINDS, Message

__all__ = ["BINARY", "ERROR_SCHEMA", "errors", "frames", "install_openapi"]

_REF = "#/components/schemas/Error"
#: The schema of a binary body (a frame, a ``.npy`` file).
BINARY: dict[str, Any] = {"type": "string", "format": "binary"}

#: The one error body (``server/errors.py``); kinds may add fields (``missing``, ``limit``...).
ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {"error": {
        "type": "object",
        "required": ["type", "message"],
        "properties": {
            "type": {"type": "string", "enum": list(ERROR_KINDS),
                     "description": "the error kind; its status and meaning are in the "
                                    "operation's responses"},
            "message": {"type": "string", "description": "what was wrong and how to fix it"},
            "traceback": {"type": "string",
                          "description": "the remote traceback, as text (user errors)"},
        },
        "additionalProperties": True,
    }},
}

# What a route's dependencies answer, derived from the dependency itself. The 403 of
# require_token: a route's scope checks (registry.visible, require_submit) answer it.
_DEPENDENCY_ERRORS: dict[Callable[..., Any], tuple[type[ApiError], ...]] = {
    require_token: (AuthError, ForbiddenError),
    require_submit: (ForbiddenError,),
    read_frame: (ProtocolError, VersionMismatchError, PayloadTooLargeError,
                 UnsupportedMediaTypeError),
}

# Parameters the routes check with names.check_name, as (the path segment before a path
# parameter, or the last segment of the path of a query parameter; the parameter's name).
# A state's name (``.../states/{name}``) is ``object.path`` and is not one of them.
_NAME_PARAMETERS = {("namespaces", "namespace"), ("objects", "name"), ("functions", "name"),
                    ("checkpoint", "name")}


# -- declared by the routes ---------------------------------------------------------------
def _describe(kinds: Iterable[type[ApiError]]) -> str:
    return "; ".join(f"{k.type}: {ERROR_KINDS[k.type].meaning}" for k in kinds)


def errors(*kinds: type[ApiError]) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route that raises these error classes, one entry per status.

    Arguments:
        kinds: the error classes the route's body can raise (``server/errors.py``).

    Returns:
        ``{status: response}`` for ``APIRouter.get(..., responses=...)``; each response
        describes its kinds and has the error body.

    Example:
        >>> from statehost.server.errors import NotFoundError, ValidationError
        >>> sorted(errors(NotFoundError, ValidationError))
        [404, 422]
    """
    by_status: dict[int, list[type[ApiError]]] = {}
    for kind in kinds:
        by_status.setdefault(kind.status, []).append(kind)
    return {status: {"description": _describe(group),
                     "content": {"application/json": {"schema": {"$ref": _REF}}}}
            for status, group in sorted(by_status.items())}


def _fields(message: type[Message]) -> str:
    return ", ".join(f"section {f.name!r}" if "Section" in str(f.type) else repr(f.name)
                     for f in dataclasses.fields(message))


def frames(request: type[Message], reply: type[Message], *kinds: type[ApiError]
           ) -> dict[str, Any]:
    """``responses=`` and ``openapi_extra=`` of a frame route, to spread into its decorator.

    Arguments:
        request: the message the route reads (``statehost.wire``).
        reply: the message it answers with.
        kinds: the error classes the route's body can raise; ``read_frame``'s own (400,
            413, 415) are added by :func:`install_openapi`.

    Returns:
        ``{"responses": ..., "openapi_extra": ...}``: the 200 answer and the request body
        as ``application/vnd.statehost.frame`` binaries, and the errors.

    Example:
        >>> from statehost.wire import PullRequest, PullReply
        >>> sorted(frames(PullRequest, PullReply)["responses"])
        [200]
    """

    def body(message: type[Message]) -> str:
        return (f"a statehost frame (see statehost.wire) holding a {message.__name__} "
                f"(kind {message.kind!r}): {_fields(message)}")

    return {
        "responses": {200: {"description": body(reply),
                            "content": {CONTENT_TYPE: {"schema": BINARY}}},
                      **errors(*kinds)},
        "openapi_extra": {"requestBody": {"required": True, "description": body(request),
                                          "content": {CONTENT_TYPE: {"schema": BINARY}}}},
    }


# -- added to the document ------------------------------------------------------------------
def _api_routes(app: FastAPI) -> Iterator[Any]:
    """Every API route, as something with its full ``path_format``, ``methods`` and
    ``dependant`` (router dependencies included).

    FastAPI 0.16x keeps an included router as one route and yields its routes' contexts
    from ``iter_route_contexts``; older releases copy them into ``app.routes``.
    """
    iterate = getattr(fastapi.routing, "iter_route_contexts", None)
    for route in iterate(app.routes) if iterate is not None else app.routes:
        if isinstance(getattr(route, "original_route", route), APIRoute):
            yield route


def _dependencies(route: Any) -> set[Callable[..., Any]]:
    seen, todo = set(), [route.dependant]
    while todo:
        dependant = todo.pop()
        if dependant.call is not None:
            seen.add(dependant.call)
        todo.extend(dependant.dependencies)
    return seen


def _merge(responses: dict[str, Any], extra: dict[int | str, dict[str, Any]]) -> None:
    """Adds ``extra`` to an operation's responses; a status both have lists both's kinds."""
    for status, response in extra.items():
        current = responses.setdefault(str(status), response)
        if current is not response:
            kinds = [k for k in response["description"].split("; ")
                     if k not in current.get("description", "")]
            current["description"] = "; ".join(filter(None, [current.get("description"),
                                                              *kinds]))
            current["content"] = response["content"]


def _name_patterns(path: str, operation: dict[str, Any]) -> None:
    segments = path.strip("/").split("/")
    for parameter in operation.get("parameters", []):
        name, where = parameter["name"], parameter["in"]
        if where == "path":
            index = segments.index("{" + name + "}")
            before = segments[index - 1] if index else ""
        elif where == "query":
            before = segments[-1]
        else:
            continue
        if (before, name) in _NAME_PARAMETERS:
            # The validator's own regex, so the document and the check cannot drift apart.
            parameter.setdefault("schema", {})["pattern"] = NAME_PATTERN


def install_openapi(app: FastAPI) -> None:
    """Makes ``app.openapi()`` return the document this module describes (built once).

    Arguments:
        app: the application, with every router included.
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                             description=app.description)
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {})["bearerAuth"] = {
            "type": "http", "scheme": "bearer",
            "description": "a token printed by `statehost serve`, from STATEHOST_TOKENS, or "
                           "made with `statehost token create`"}
        routes = {(r.path_format, m.lower()): r for r in _api_routes(app) for m in r.methods}
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                route = routes[(path, method)]
                calls = _dependencies(route)
                responses = operation.setdefault("responses", {})
                for dependency, kinds in _DEPENDENCY_ERRORS.items():
                    if dependency in calls:
                        _merge(responses, errors(*kinds))
                if getattr(route, "body_field", None) is not None:
                    # A body FastAPI parses: one that is not JSON answers 400 before validation.
                    _merge(responses, errors(ProtocolError))
                if require_token in calls:
                    operation["security"] = [{"bearerAuth": []}]
                if "HTTPValidationError" in str(responses.get("422")):
                    # FastAPI's own 422 (a RequestValidationError) answers the one error body.
                    responses["422"] = errors(ValidationError)[422]
                _name_patterns(path, operation)
                operation["responses"] = dict(sorted(responses.items()))
        schemas = components.setdefault("schemas", {})
        schemas["Error"] = ERROR_SCHEMA
        for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's, if now unused
            if f'"#/components/schemas/{name}"' not in json.dumps(schema):
                schemas.pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

