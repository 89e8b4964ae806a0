"""OpenAI's error body, {"error": {"message", "type", "param", "code"}}, for every failure.

The app's exception handlers answer with it for an APIError, a validation error (a 400, never
FastAPI's 422, and the OpenAPI schema says so), an HTTP error and any unhandled exception;
`raise_if_failed` turns a request the engine aborted or failed into an APIError. A 404 lists the
endpoints that do exist (OpenAI's /v1/responses, for one, is not served: chat completions is).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from engram_serve.engine.request import RequestOutput
from engram_serve.server import protocol as p

logger = logging.getLogger("engram_serve.server")


def error_response(error: p.APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def api_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """pydantic's errors as one 400: the first field's problem, and where it is."""
    errors = exc.errors() or [{"msg": "invalid request", "loc": (), "type": ""}]
    if errors[0].get("type") == "json_invalid":
        reason = errors[0].get("ctx", {}).get("error", "cannot parse the body")
        return error_response(p.APIError(400, f"malformed JSON: {reason}"))
    fields = list(dict.fromkeys(_error_path(e)[:1] for e in errors))
    where, text = _field_problem([e for e in errors if _error_path(e)[:1] == fields[0]])
    message = f"{'.'.join(where) or 'body'}: {text}"
    if len(fields) > 1:
        message += f" (and {len(fields) - 1} more field{'s' if len(fields) > 2 else ''} wrong)"
    return error_response(p.APIError(400, message, ".".join(where) or None))


def _error_path(error: dict[str, Any]) -> tuple[str, ...]:
    """Where an error is, without "body" and the union-member tags pydantic puts in the path
    (type names: "str", "list[str]", "function-after[...]")."""
    tags = ("str", "int", "float", "bool", "list", "dict")
    loc = error.get("loc", ())
    return tuple(str(x) for x in loc if x != "body" and not (x in tags or "[" in str(x)))


def _field_problem(errors: list[dict[str, Any]]) -> tuple[tuple[str, ...], str]:
    """One field's problem. A union (prompt: text, token ids, ...) fails once per member: a
    value error (the type fit) says most, then the deepest error; members that all refuse the
    type at one place are named together ("a valid string or a valid list")."""

    def is_type_error(e: dict[str, Any]) -> bool:
        return e.get("type", "").endswith(("_type", "_parsing"))

    best = min(errors, key=lambda e: (is_type_error(e), -len(_error_path(e))))
    where = _error_path(best)
    if not is_type_error(best):
        return where, best["msg"]
    same = [e["msg"] for e in errors if is_type_error(e) and _error_path(e) == where]
    first, *others = dict.fromkeys(same)
    return where, " or ".join([first, *(m.removeprefix("Input should be ") for m in others)])


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    message = str(exc.detail)
    if exc.status_code == 404:  # the endpoints as the OpenAPI schema lists them
        endpoints = ", ".join(
            f"{method.upper()} {path}"
            for path, operations in request.app.openapi()["paths"].items()
            for method in operations
        )
        message = f"no endpoint {request.method} {request.url.path}; this server has {endpoints}"
    error = p.APIError(exc.status_code, message, headers=getattr(exc, "headers", None))
    return error_response(error)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("Unhandled error in %s %s", request.method, request.url.path)
    return error_response(p.APIError(500, f"internal server error: {type(exc).__name__}"))


def openapi_without_422(app: FastAPI) -> dict[str, Any]:
    """FastAPI documents a 422 for every body; this server answers 400 instead."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def raise_if_failed(output: RequestOutput) -> None:
    if not output.finished:
        return
    reason = output.outputs[0].finish_reason
    if reason == "abort":  # only aborts the client did not cause reach here: shutdown
        raise p.APIError(503, "the request was aborted: the server is shutting down")
    if reason == "error":  # the engine names the file in its log; clients get no paths
        raise p.APIError(500, "the request failed: its Engram rows could not be read from storage")


__all__ = [
    "api_error",
    "error_response",
    "http_error",
    "internal_error",
    "openapi_without_422",
    "raise_if_failed",
    "validation_error",
]
